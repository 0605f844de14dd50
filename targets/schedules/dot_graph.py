"""Graph rewrite for CPUs with a 4-way int8 dot product (aarch64 ``sdot``, ``CpuVector.dot_product``):
the integer convolutions qdq_integer.py wrote become dot-product convolutions (dot_kernels.py).

    add(conv2d(x_u8, W, out_dtype=int32), c)  ->  add(conv2d_dot(x_u8, P), c + 128 * sum(W[..., o]))

for a Relax ``conv2d`` in channels-last layout (NHWC data, HWIO constant weights), groups 1,
uint8 or int8 activations, int8 weights (stored int16 on aarch64: the values are int8),
whose input and output channels are multiples of 4, followed by the add of a constant
(qdq_integer's zero-point correction and int32 bias; it has one whenever the activation's zero
point or the layer's bias is nonzero). A conv2d without one (a zero-point-0 input and a float
bias, as ResNet-18's first convolution of a block after the residual ReLU) gets an add of the
correction alone: ``conv2d(x, W) -> add(conv2d_dot(x, P), 128 * sum(W[..., o]))`` (before this,
such layers kept the int16 ``smlal`` kernel).

On aarch64 without ``sdot`` (``pair``, ``CpuVector.pair_product``) the same rewrite, shift and
correction write a pair-product convolution instead (conv2d_pair.py: weights packed
``[kh, kw, ic/16, oc, 16]``, input channels multiples of 16, no weight of -128).

Signedness: ``sdot`` multiplies int8 by int8, ``udot`` uint8 by uint8 (``usdot``, uint8 x int8,
is armv8.6's i8mm, which a Cortex-A55 lacks). The activations are uint8 codes ``x``, the
weights int8 ``w``. Shifting the weights (``udot`` on ``w + 128``) subtracts ``128 * sum(x)`` over
each output pixel's window: a term that depends on the input, computed at run time. Shifting
the activations (``x - 128``, an ``eor`` with 0x80 of each 16-byte vector the kernel loads, int8
exactly) subtracts ``128 * sum(w[..., o])``: a constant per output channel, added to the
constant after the convolution here, at compile time. So the kernel computes
``sum((x - 128) * w)`` with ``sdot``, exact in int32, and the rewritten graph's accumulator equals
the original one bit for bit (padding pads ``x`` before the shift, with the same value).
int8 activations need no shift.

The weights are repacked here, once, to ``P[kh, kw, ic/4, oc, 4] = W[kh, kw, 4*(ic/4) + i, oc]``:
the 16 bytes one ``sdot`` multiplies (4 output channels x 4 input channels) are contiguous.
Runs after the layout pass and the channel padding (graph.py), before LegalizeOps; FuseOps then
fuses ``conv2d_dot`` with its epilogue (the requantization) as it does a ``conv2d``.
"""

from __future__ import annotations

import logging

import numpy as np

from edgec.core.fallbacks import FallbackLog
from edgec.targets.schedules import conv2d_pair, dot_kernels
from edgec.targets.schedules.dot_kernels import GROUP, SHIFT
from edgec.targets.schedules.guard import describe_call
from edgec.targets.schedules.te_rewrite import not_dense_nhwc
from edgec.targets.schedules.qdq_integer import is_op, use_counts

log = logging.getLogger(__name__)

RULE = "graph:dot-product"


def pack_weights(weight: np.ndarray, group: int = GROUP) -> np.ndarray:
    """HWIO integer weights with int8 values -> int8 ``[kh, kw, ic/group, oc, group]`` (module
    docstring; ``group`` 16: the pair-product kernel's blocks, conv2d_pair.py)."""
    kh, kw, channels, filters = weight.shape
    grouped = weight.reshape(kh, kw, channels // group, group, filters)
    return np.ascontiguousarray(grouped.transpose(0, 1, 2, 4, 3)).astype(np.int8)


def shift_correction(weight: np.ndarray, activation_dtype: str) -> np.ndarray:
    """int64 ``[oc]``: what the shifted activations take away, ``SHIFT * sum(W[..., o])``
    (uint8 activations), zero for int8 ones."""
    if activation_dtype == "int8":
        return np.zeros(weight.shape[-1], np.int64)
    return SHIFT * weight.reshape(-1, weight.shape[-1]).astype(np.int64).sum(axis=0)


def ineligible(call, weight: np.ndarray | None, pair: bool = False) -> str | None:
    """Why the Relax conv2d ``call`` (``weight`` its constant weights or None) does not become a
    dot-product convolution (``pair``: a pair-product one, conv2d_pair.py), or None."""
    reason = not_dense_nhwc(call, weight)
    if reason is not None:
        return reason
    data_dtype, out_dtype = str(call.args[0].ty.dtype), str(call.ty.dtype)
    if data_dtype not in ("uint8", "int8") or out_dtype != "int32":
        return f"{data_dtype} activations -> {out_dtype}, not 8-bit -> int32"
    if weight.dtype.kind != "i" or weight.min() < -128 or weight.max() > 127:
        return f"{weight.dtype} weights outside int8"
    channels, filters = weight.shape[2], weight.shape[3]
    group = conv2d_pair.BLOCK if pair else GROUP
    if channels % group or filters % GROUP:
        return f"{channels} -> {filters} channels, not multiples of {group} -> {GROUP}"
    if pair and weight.min() < -127:
        return "a weight of -128 (two products of an int16 lane could overflow)"
    if any(not hasattr(dim, "value") for dim in call.args[0].ty.shape):
        return "the input shape is not static"
    return None


def added_to_constants(func) -> set:
    """The calls of ``func`` whose result is only added to a constant (``add(v, c)``, ``v`` bound to them)."""
    import tvm
    from tvm import relax

    bound, added = {}, set()
    for block in func.body.blocks:
        for binding in block.bindings:
            bound[binding.var] = binding.value
            value = binding.value
            if is_op(value, "relax.add") and isinstance(value.args[0], relax.Var) and value.args[0] in bound:
                constant = value.args[1]
                if isinstance(bound.get(constant, constant), tvm.ir.expr.Constant):
                    added.add(bound[value.args[0]])
    return added


def dot_product_conv2d(fallbacks: FallbackLog | None = None, pair: bool = False):
    """A module pass rewriting the convolutions above (module docstring); ``pair``: as pair-product
    convolutions (conv2d_pair.py, for aarch64 without ``sdot``) instead, the same shift."""
    import tvm
    from tvm import relax

    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if is_op(call, "relax.nn.conv2d") and str(call.ty.dtype) == "int32" and call not in self.added:
                conv, constant = call, np.zeros(1, np.int64)  # no add after it: the correction alone
            else:
                conv = self._bound(call.args[0]) if is_op(call, "relax.add") else None
                constant = self._constant(call.args[1]) if is_op(conv, "relax.nn.conv2d") else None
            if constant is None:
                return call
            if conv is not call and self.uses.get(call.args[0], 0) != 1:
                log.debug("%s: its int32 result is used elsewhere too; kept", describe_call(conv))
                return call
            weight = self._constant(conv.args[1])
            reason = ineligible(conv, weight, pair)
            if reason is not None:
                log.debug("%s: no dot product (%s)", describe_call(conv), reason)
                return call
            try:
                return self._dot(conv, weight, constant)
            except Exception as error:  # noqa: BLE001 - keep the convolution
                fallbacks.add(describe_call(conv), RULE, error, "kept as a conv2d")
                return call

        def _bound(self, expr):
            return self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr

        def _constant(self, expr):
            expr = self._bound(expr)
            return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None

        def _dot(self, conv, weight, constant):
            attrs = conv.attrs
            data = conv.args[0]
            dtype = str(data.ty.dtype)
            correction = shift_correction(weight, dtype)
            # the add's constant broadcasts over NHWC; the correction is per output channel (last axis)
            combined = constant.astype(np.int64) + correction
            if np.abs(combined).max() > np.iinfo(np.int32).max:
                raise ValueError("the shifted correction overflows int32")
            shape = [int(dim) for dim in conv.ty.shape]
            geometry = dot_kernels.Geometry(
                padding=tuple(int(p) for p in attrs.padding),
                strides=tuple(int(s) for s in attrs.strides),
                dilation=tuple(int(d) for d in attrs.dilation),
                out_size=(shape[1], shape[2]),
            )
            if pair:
                packed = relax.const(pack_weights(weight, conv2d_pair.BLOCK), "int8")
                kernel = self.builder_.call_te(lambda x, w: conv2d_pair.conv2d_pair(x, w, geometry), data, packed,
                                               primfunc_name_hint=conv2d_pair.KERNEL)  # fmt: skip
            else:
                packed = relax.const(pack_weights(weight), "int8")
                kernel = self.builder_.call_te(lambda x, w: dot_kernels.conv2d_dot(x, w, geometry), data, packed,
                                               primfunc_name_hint=dot_kernels.KERNEL)  # fmt: skip
            accumulated = self.builder_.emit(kernel)
            return relax.op.add(accumulated, relax.const(combined.astype(np.int32), "int32"))

    @tvm.transform.module_pass(opt_level=0, name="EdgecDotProductConv2d")
    def _pass(mod, _ctx):
        rewriter = _Rewriter(mod)
        bodies = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.uses = use_counts(func)
                rewriter.added = added_to_constants(func)
                bodies[gvar] = rewriter.visit_expr(func)
        rewritten = rewriter.builder_.get()
        for gvar, body in bodies.items():
            rewritten[gvar] = body
        return relax.transform.DeadCodeElimination()(rewritten)

    return _pass
