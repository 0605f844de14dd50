"""QDQ convolutions and matmuls as integer kernels (a Relax rewrite, before the layout pass).

TVM's ONNX importer turns a QDQ graph into ``relax.quantize`` / ``relax.dequantize`` around
float ops, which LegalizeOps computes in float32. This rewrite finds::

    y_q = quantize(act(conv2d(dequantize(x_q, s_x, zp_x), dequantize(W_q, s_w, 0)) + bias), s_y, zp_y)

(``conv2d`` any groups, depthwise included, or ``matmul`` with ``permute_dims`` of the weights
as the ONNX importer writes Gemm; ``+ bias`` optional, an int32 ``dequantize`` at
``s_x * s_w`` or a float constant; ``act`` none, or ``maximum``/``minimum`` with scalar
constants, i.e. ReLU, ReLU6, Clip; the ``quantize`` optional: without it the layer's output
is float) and writes instead::

    acc = conv2d(pad(x_q, zp_x), W_q, out_dtype="int32") + (bias_q - zp_x * sum(W_q[o]))   int32
    y_q = clip(nearbyint(float32(acc) * M[o]) + zp_y, lo, hi)                              M = s_x * s_w[o] / s_y

so the kernel multiplies uint8 (or int8) activations by int8 weights into an int32
accumulator, and the weights stay int8 constants in the module (``lib.so``'s params).
Zero-point handling: the activation's zero point is subtracted through the precomputed
per-channel ``zp_x * sum(W_q[o])`` folded into the int32 bias; padding therefore pads with
``zp_x`` (an explicit ``pad``, the value that dequantizes to 0.0), not 0. The weight's zero
point must be 0 (symmetric weights, as ``quantize-int8`` and ORT write them).

Rounding: like ONNX Runtime's QLinearConv (MLAS), the float32 multiplier ``M`` is computed as
``float32(s_x * s_w) / s_y``, the result clamped to ``[lo - zp_y, hi - zp_y]`` and rounded half
to even by adding ``1.5 * 2**23`` (MLAS's trick), cast to int32 (exact: the sum is an integer)
and ``1.5 * 2**23 - zp_y`` subtracted in int32 (subtracting it in float32 gets simplified away
once the epilogue is inlined; Relax's ``round`` is ``llvm.round``, half away from zero, and unary
ops have no layout rule: they would split the epilogue from the convolution with transposes). All of it is binary element-wise Relax ops and a
cast, which the layout pass moves to NHWC and FuseOps fuses into the convolution's epilogue. ``act`` becomes the clip bounds ``nearbyint(lo / s_y) + zp_y``
(exact: rounding is monotone). Without an output ``quantize`` the float output is
``float32(acc) * (s_x * s_w[o]) + bias``.

A pattern that does not fit (per-tensor activations only; weights constant; ...) is left to
TVM's float lowering; nothing here can fail a build (graph.py runs it ``guarded``).
"""

from __future__ import annotations

import logging

import numpy as np

from edgec.core.fallbacks import FallbackLog

log = logging.getLogger(__name__)

RULE = "graph:qdq-integer"
# 1.5 * 2**23: adding it to a float32 |v| < 2**22 leaves no fraction bits, so the sum is v rounded
# half to even (the default rounding mode), as MLAS's requantize does
ROUNDING = 12582912.0
_ACCUMULATOR = "int32"


def qdq_integer(fallbacks: FallbackLog | None = None, weight_dtype: str = "int8"):
    """The module pass described above; ``fallbacks`` is unused (a pattern that does not fit is
    simply not one), kept for the graph passes' common signature. ``weight_dtype``: the dtype
    the int8 weights are stored in (``int16``: widened at compile time, see ``weight_dtype``)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod, uses, quantized: bool):
            super().__init__(mod)
            self.uses = uses
            self.quantized = quantized  # first run: quantize(...) chains; second: layers with a float output
            self.rewritten = 0

        def visit_call_(self, call):
            call = super().visit_call_(call)
            try:
                if self.quantized and is_op(call, "relax.quantize"):
                    found = _match_quantized(call, self.lookup_binding, self.uses)
                elif not self.quantized and (is_op(call, "relax.nn.conv2d") or is_op(call, "relax.matmul")):
                    found = _match_layer(call, self.lookup_binding)
                else:
                    return call
                integer = _integer_expr(found, weight_dtype)
            except _NoMatch as reason:
                log.debug("qdq-integer: %s left in float: %s", getattr(call.op, "name", call.op), reason)
                return call
            self.rewritten += 1
            return integer

    @tvm.transform.module_pass(opt_level=0, name="EdgecQdqInteger")
    def _pass(mod, _ctx):
        mod = mod.clone()  # the module the build got stays as imported (compile's retry rebuilds from it)
        for quantized in (True, False):
            for gvar, func in list(mod.functions_items()):
                if isinstance(func, relax.Function):
                    rewriter = _Rewriter(mod, use_counts(func), quantized)
                    mod[gvar] = rewriter.visit_expr(func)
                    log.info("qdq-integer: %d %s layer(s) of %s lowered to integer kernels", rewriter.rewritten,
                             "quantized" if quantized else "float-output", gvar.name_hint)  # fmt: skip
            mod = relax.transform.DeadCodeElimination()(mod)
        return mod

    return _pass


class _NoMatch(Exception):
    """The expression is not a QDQ layer this rewrite lowers (the message says why)."""


class _Layer:
    """What the integer expression needs: the layer call, its integer operands and scales."""

    def __init__(self, anchor, x_q, s_x, zp_x, w_q, s_w, channel_axis):
        self.anchor = anchor  # the float relax.nn.conv2d / relax.matmul call
        self.x_q, self.s_x, self.zp_x = x_q, s_x, zp_x
        self.w_q = w_q  # int8 weights, the layout the anchor uses (OIHW, or [K, O] for matmul)
        self.s_w = s_w  # float32 [O]
        self.channel_axis = channel_axis  # of the output
        self.bias_q: np.ndarray | None = None  # int32 [O] at s_x * s_w
        self.bias_f: np.ndarray | None = None  # float32 [O]
        self.out: tuple[float, int, str, float, float] | None = None  # (s_y, zp_y, dtype, lo, hi) codes


def is_op(expr, name: str) -> bool:
    from tvm import relax

    return isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == name


def use_counts(func) -> dict:
    """How many bindings (and the function's result) use each variable."""
    from tvm import relax

    counts: dict = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            for var in relax.analysis.free_vars(binding.value):
                counts[var] = counts.get(var, 0) + 1
    for var in relax.analysis.free_vars(func.body.body):
        counts[var] = counts.get(var, 0) + 1
    return counts


def _resolve(expr, lookup):
    """``expr`` with variables replaced by what they are bound to (one level at a time)."""
    from tvm import relax

    while isinstance(expr, relax.Var):
        bound = lookup(expr)
        if bound is None:
            return expr
        expr = bound
    return expr


def _constant(expr, lookup) -> np.ndarray:
    """The NumPy value of a constant expression: constants, reshape, permute_dims, dequantize."""
    import tvm

    expr = _resolve(expr, lookup)
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    if is_op(expr, "relax.reshape"):
        return _constant(expr.args[0], lookup).reshape([int(dim) for dim in expr.ty.shape])
    if is_op(expr, "relax.dequantize"):
        q, scale, zp = (_constant(arg, lookup) for arg in expr.args)
        axis = int(expr.attrs.axis)
        return ((q.astype(np.int64) - _along(zp, q.ndim, axis)) * _along(scale, q.ndim, axis)).astype(np.float32)
    raise _NoMatch(f"{getattr(expr, 'op', expr)} is not a constant")


def _along(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A scalar or a [C] vector, shaped to broadcast along ``axis`` of an ``ndim``-D tensor."""
    values = np.asarray(values)
    if values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = values.size
    return values.reshape(shape)


def _scalar(expr, lookup) -> np.ndarray:
    value = _constant(expr, lookup)
    if value.size != 1:
        raise _NoMatch("per-channel activation quantization")
    return value.reshape(())


def _match_layer(anchor, lookup) -> _Layer:
    """conv2d / matmul of a dequantized per-tensor activation and dequantized constant int8 weights."""
    data, weight = (_resolve(arg, lookup) for arg in anchor.args[:2])
    if not is_op(data, "relax.dequantize"):
        raise _NoMatch("the activation is not dequantized")
    x_q = data.args[0]
    if x_q.ty.dtype not in ("uint8", "int8"):
        raise _NoMatch(f"activation dtype {x_q.ty.dtype}")
    s_x, zp_x = _scalar(data.args[1], lookup), _scalar(data.args[2], lookup)
    transposed = is_op(weight, "relax.permute_dims")
    if transposed:
        if weight.attrs.axes is not None and [int(a) for a in weight.attrs.axes] != [1, 0]:
            raise _NoMatch("a weight permutation other than a 2-D transpose")
        weight = _resolve(weight.args[0], lookup)
    if not is_op(weight, "relax.dequantize"):
        raise _NoMatch("the weights are not dequantized")
    w_q = _constant(weight.args[0], lookup)
    if w_q.dtype != np.int8:
        raise _NoMatch(f"weight dtype {w_q.dtype}")
    if np.any(_constant(weight.args[2], lookup) != 0):
        raise _NoMatch("asymmetric weights (nonzero weight zero point)")
    scale = _constant(weight.args[1], lookup).astype(np.float32).reshape(-1)
    axis = int(weight.attrs.axis) % w_q.ndim
    if is_op(anchor, "relax.nn.conv2d"):
        if anchor.attrs.data_layout != "NCHW" or anchor.attrs.kernel_layout != "OIHW" or anchor.attrs.out_layout != "NCHW":
            raise _NoMatch("conv2d not NCHW/OIHW")
        if scale.size > 1 and axis != 0:
            raise _NoMatch("weights quantized along an axis other than the output channels")
        channels, channel_axis = w_q.shape[0], 1
    else:
        if w_q.ndim != 2 or anchor.args[0].ty.ndim < 2:
            raise _NoMatch("matmul that is not [..., K] x [K, N]")
        out_axis = 0 if transposed else 1
        if scale.size > 1 and axis != out_axis:
            raise _NoMatch("weights quantized along the reduction axis")
        if transposed:
            w_q = np.ascontiguousarray(w_q.T)
        channels, channel_axis = w_q.shape[1], -1
    s_w = np.broadcast_to(scale, (channels,)).astype(np.float32)
    return _Layer(anchor, x_q, s_x, zp_x, w_q, s_w, channel_axis)


def _match_quantized(quantize, lookup, uses) -> _Layer:
    """quantize(act(layer + bias)): the whole chain, every intermediate used once."""
    s_y, zp_y = _scalar(quantize.args[1], lookup), _scalar(quantize.args[2], lookup)
    dtype = str(quantize.attrs.out_dtype)
    info = np.iinfo(dtype)
    lo, hi = float(info.min), float(info.max)
    expr = quantize.args[0]
    while True:  # activation: max/min with scalar constants, outermost first
        inner = _step(expr, lookup, uses)
        if is_op(inner, "relax.maximum") or is_op(inner, "relax.minimum"):
            bound = float(_scalar(inner.args[1], lookup))
            code = float(np.float32(bound) / np.float32(s_y))
            code = float(np.rint(code)) + float(zp_y)
            if is_op(inner, "relax.maximum"):
                lo = max(lo, code)
            else:
                hi = min(hi, code)
            expr = inner.args[0]
            continue
        break
    bias = None
    inner = _step(expr, lookup, uses)
    if is_op(inner, "relax.add"):
        bias, expr = inner.args[1], inner.args[0]
        inner = _step(expr, lookup, uses)
    if not (is_op(inner, "relax.nn.conv2d") or is_op(inner, "relax.matmul")):
        raise _NoMatch("no conv2d / matmul under the quantize")
    layer = _match_layer(inner, lookup)
    if bias is not None:
        _attach_bias(layer, bias, lookup)
    layer.out = (float(s_y), int(zp_y), dtype, lo, hi)
    return layer


def _step(expr, lookup, uses):
    """The call bound to ``expr`` when only the chain uses it, else raise."""
    from tvm import relax

    if isinstance(expr, relax.Var) and uses.get(expr, 0) > 1:
        raise _NoMatch("an intermediate value is used elsewhere")
    return _resolve(expr, lookup)


def _attach_bias(layer: _Layer, bias, lookup) -> None:
    """An int32 dequantize at s_x * s_w (kept integer) or any float constant [O] (added in float)."""
    channels = layer.s_w.size
    core = _resolve(bias, lookup)
    while is_op(core, "relax.reshape"):
        core = _resolve(core.args[0], lookup)
    if is_op(core, "relax.dequantize"):
        q = _constant(core.args[0], lookup)
        zp = _constant(core.args[2], lookup)
        scale = np.broadcast_to(_constant(core.args[1], lookup).astype(np.float32).reshape(-1), (channels,))
        expected = (np.float32(layer.s_x) * layer.s_w).astype(np.float32)
        if q.dtype == np.int32 and q.size == channels and not np.any(zp) and np.allclose(scale, expected, rtol=1e-6, atol=0):
            layer.bias_q = q.reshape(-1).astype(np.int32)
            return
    value = _constant(bias, lookup).astype(np.float32)
    if value.size != channels:
        raise _NoMatch(f"bias of shape {value.shape} is not per output channel")
    layer.bias_f = value.reshape(-1)


def weight_dtype(lane_multiply_add: bool) -> str:
    """How the kernels' int8 weights are stored: ``int16`` on a CPU with a lane multiply-add
    (aarch64), whose ``smlal v.4s, v.4h, v.h[i]`` multiplies int16 halves: widened once at
    compile time instead of an ``sshll`` per weight vector in every inner loop (lib.so holds
    twice the weight bytes); elsewhere ``int8`` (x86 widens in the load, ``vpmovsxbd``)."""
    return "int16" if lane_multiply_add else "int8"


def _integer_expr(layer: _Layer, stored: str = "int8"):
    """The Relax expression computing the layer with an int32 accumulator (see the module doc);
    ``stored``: the weights' dtype (``weight_dtype``), the same values."""
    from tvm import relax

    anchor = layer.anchor
    ndim = anchor.ty.ndim
    x = layer.x_q
    w_sum = layer.w_q.reshape(layer.w_q.shape[0], -1).astype(np.int64).sum(axis=1) if layer.channel_axis == 1 else \
        layer.w_q.astype(np.int64).sum(axis=0)
    correction = -int(layer.zp_x) * w_sum
    if layer.bias_q is not None:
        correction = correction + layer.bias_q.astype(np.int64)
    weights = relax.const(layer.w_q.astype(stored), stored)
    if layer.channel_axis == 1:
        attrs = anchor.attrs
        padding = [int(p) for p in attrs.padding]
        if int(layer.zp_x) != 0 and any(padding):
            top, left, bottom, right = padding
            x = relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], "constant", float(layer.zp_x))
            padding = [0, 0, 0, 0]
        acc = relax.op.nn.conv2d(x, weights, strides=attrs.strides, padding=padding, dilation=attrs.dilation,
                                 groups=int(attrs.groups), data_layout="NCHW", kernel_layout="OIHW",
                                 out_dtype=_ACCUMULATOR)  # fmt: skip
    else:
        acc = relax.op.matmul(x, weights, out_dtype=_ACCUMULATOR)
    if np.any(np.abs(correction) > np.iinfo(np.int32).max):
        raise _NoMatch("the zero-point correction overflows int32")
    if np.any(correction):
        acc = relax.op.add(acc, relax.const(_along(correction.astype(np.int32), ndim, layer.channel_axis), _ACCUMULATOR))
    real = relax.op.astype(acc, "float32")
    s_xw = (np.float32(layer.s_x) * layer.s_w).astype(np.float32)  # MLAS: X_scale * W_scale[o] / Y_scale, float32
    if layer.out is None:
        out = relax.op.multiply(real, _vector(s_xw, ndim, layer.channel_axis))
        if layer.bias_f is not None:
            out = relax.op.add(out, _vector(layer.bias_f, ndim, layer.channel_axis))
        return out
    s_y, zp_y, dtype, lo, hi = layer.out
    scaled = relax.op.multiply(real, _vector((s_xw / np.float32(s_y)).astype(np.float32), ndim, layer.channel_axis))
    if layer.bias_f is not None:
        scaled = relax.op.add(scaled, _vector((layer.bias_f / np.float32(s_y)).astype(np.float32), ndim, layer.channel_axis))
    return round_to_codes(scaled, zp_y, lo, hi, dtype)


def round_to_codes(scaled, zero: int, lo: float, hi: float, dtype: str):
    """``scaled`` (float32, in units of the output step) -> codes: MLAS's order, clamp to
    ``[lo - zero, hi - zero]``, round half to even (+ ROUNDING, cast to int32), + zero, cast to ``dtype``."""
    from tvm import relax

    scaled = relax.op.minimum(relax.op.maximum(scaled, _scalar_const(lo - zero)), _scalar_const(hi - zero))
    rounded = relax.op.astype(relax.op.add(scaled, _scalar_const(ROUNDING)), _ACCUMULATOR)  # an exact integer
    return relax.op.astype(relax.op.add(rounded, relax.const(np.int32(zero - int(ROUNDING)), _ACCUMULATOR)), dtype)


def _vector(values: np.ndarray, ndim: int, axis: int):
    from tvm import relax

    return relax.const(_along(np.asarray(values, np.float32), ndim, axis), "float32")


def _scalar_const(value: float):
    from tvm import relax

    return relax.const(np.float32(value), "float32")
