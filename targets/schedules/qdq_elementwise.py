"""Per-tensor quantize / dequantize of activations as element-wise Relax ops (after qdq_integer.py).

What qdq_integer.py leaves of a QDQ graph is float ops between ``relax.quantize`` and
``relax.dequantize`` (residual adds, concat, pooling, the float first and last layers). Those two
ops have no layout rule, so the layout pass wraps each in NHWC <-> NCHW transposes, and LegalizeOps
rounds ``quantize`` with ``llvm.round`` (half away from zero) where ONNX Runtime rounds half to
even. With a scalar scale and zero point (per-tensor, what activations use) they become::

    dequantize(q)  = float32(int32(q) - zp) * s
    quantize(x)    = cast(int32(clamp(x / s, lo - zp, hi - zp) + 1.5 * 2**23) + (zp - 1.5 * 2**23))

(``x / s`` divided, as ONNX Runtime does; rounding half to even as in qdq_integer.py), binary
element-wise ops and casts that follow the layout and fuse with their neighbours. Per-channel
ones (weights of float layers, constants) stay as they are.
"""

from __future__ import annotations

import numpy as np

from edgec.core.fallbacks import FallbackLog
from edgec.targets.schedules.qdq_integer import is_op, round_to_codes

RULE = "graph:qdq-elementwise"


def qdq_elementwise(fallbacks: FallbackLog | None = None):
    """The module pass described above (``fallbacks``: unused, the graph passes' common signature)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (is_op(call, "relax.quantize") or is_op(call, "relax.dequantize")):
                return call
            scale, zero = (_scalar(self, arg) for arg in call.args[1:3])
            if scale is None or zero is None:
                return call
            if is_op(call, "relax.dequantize"):
                if isinstance(call.args[0], tvm.ir.expr.Constant) or call.args[0].ty.dtype not in ("uint8", "int8"):
                    return call  # constants: folded or left to the float path; int32 (bias) likewise
                if str(call.attrs.out_dtype) != "float32":
                    return call
                return _dequantize(call.args[0], float(scale), int(zero))
            dtype = str(call.attrs.out_dtype)
            if dtype not in ("uint8", "int8") or call.args[0].ty.dtype != "float32":
                return call
            return _quantize(call.args[0], float(scale), int(zero), dtype)

    @tvm.transform.module_pass(opt_level=0, name="EdgecQdqElementwise")
    def _pass(mod, _ctx):
        mod = mod.clone()
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gvar] = _Rewriter(mod).visit_expr(func)
        return mod

    return _pass


def _scalar(mutator, expr) -> np.ndarray | None:
    """The value of a one-element constant (directly or through a binding), else None."""
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Var):
        expr = mutator.lookup_binding(expr)
    if not isinstance(expr, tvm.ir.expr.Constant):
        return None
    value = expr.value.numpy()
    return value.reshape(()) if value.size == 1 else None


def _dequantize(q, scale: float, zero: int):
    from tvm import relax

    value = relax.op.astype(q, "int32")
    if zero:
        value = relax.op.subtract(value, relax.const(np.int32(zero), "int32"))
    return relax.op.multiply(relax.op.astype(value, "float32"), relax.const(np.float32(scale), "float32"))


def _quantize(x, scale: float, zero: int, dtype: str):
    from tvm import relax

    info = np.iinfo(dtype)
    scaled = relax.op.divide(x, relax.const(np.float32(scale), "float32"))
    return round_to_codes(scaled, zero, float(info.min), float(info.max), dtype)
