"""``edgec.TernaryConv`` and ``edgec.TernaryGemm``: layers whose weights are 2 bits per value.

The weight of output channel ``o`` is ``scale[o] * t`` with ``t`` in
``{-1, 0, +1}`` (PTQ pruning ternary quantization, TWN: ``{-a, 0, +a}``),
stored as two bit planes, each packed as ``edgec.BinaryConv``'s bits
(little-endian along the input channels, 8 to a byte)::

    TernaryConv  weight_bits  uint8 (2, C_out, kh, kw, ceil(C_in / group / 8))
    TernaryGemm  weight_bits  uint8 (2, N, ceil(K / 8))
                 plane 0: t != 0        plane 1: t < 0
    both         scale        float32 (C_out,) / (N,);  bias float32, optional

so a float32 weight takes 16x less room (plus one scale per channel). The
ops compute (float activations; NCHW for the Conv)::

    y = act(conv(x, t) * scale[o] + bias[o])        /   act(A @ t^T * scale + bias)

with ``act`` one of none, Relu, Clip(activation_min, activation_max). The
NumPy reference convolves in float64 and applies scale and bias in float32.

Kernel (CPU): weight-only. The bit planes stay packed in the artifact and
``edgec_ternary_decode`` (edgec/ops/binary_conv.py's ``decode_kernel``, two
planes) expands them at run time into float32 ``scale * t`` in HWIO layout,
followed by Relax's ``conv2d`` / ``matmul``, which the CPU schedules handle as
any float layer: the cost is the float layer's plus the decode. CUDA: decoded
at compile time to a dense float32 weight (a warning is logged).
"""

from __future__ import annotations

import logging

import numpy as np
from onnx.reference.op_run import OpRun

from edgec.ops import DOMAIN, CustomOp, register
from edgec.ops.binary_conv import (
    epilogue_reference,
    text_attribute,
    conv2d_nchw,
    conv_inputs,
    emit_decode,
    emit_float_conv,
    emit_float_gemm,
    float_weight_hwio,
    gemm_inputs,
    is_cuda,
    op_attributes,
    unpack_bits,
)

log = logging.getLogger(__name__)

__all__ = ["TernaryConv", "TernaryGemm", "ternary_weights"]


def ternary_weights(weight_bits: np.ndarray, count: int) -> np.ndarray:
    """``(2, O, ..., ceil(count/8))`` bit planes -> ``t`` float64 ``(O, ..., count)`` in {-1, 0, +1}."""
    planes = unpack_bits(weight_bits, count).astype(np.float64)
    if planes.shape[0] != 2:
        raise ValueError(f"ternary weight bits need 2 planes (nonzero, negative), got {planes.shape[0]}")
    return planes[0] * (1.0 - 2.0 * planes[1])


class TernaryConv(OpRun):
    """NumPy reference: ``act(conv(x, t) * scale + bias)``, see the module docstring."""

    op_domain = DOMAIN

    def _run(  # noqa: PLR0913 - the op's inputs and attributes
        self,
        x,
        weight_bits,
        scale,
        bias=None,
        kernel_shape=None,
        strides=None,
        pads=None,
        dilations=None,
        group=1,
        activation="none",
        activation_min=float("-inf"),
        activation_max=float("inf"),
    ):
        group = int(group or 1)
        unit = np.moveaxis(ternary_weights(weight_bits, x.shape[1] // group), 3, 1)  # (O, C/g, kh, kw)
        if kernel_shape is not None and tuple(kernel_shape) != unit.shape[2:]:
            raise ValueError(f"kernel_shape {tuple(kernel_shape)} but weight bits of {unit.shape[2:]}")
        dot = conv2d_nchw(x, unit, strides or (1, 1), pads or (0, 0, 0, 0), dilations or (1, 1), group)
        return (epilogue_reference(dot, scale, bias, (1, -1, 1, 1), activation, activation_min, activation_max),)


class TernaryGemm(OpRun):
    """NumPy reference: ``act(A @ t^T * scale + bias)``."""

    op_domain = DOMAIN

    def _run(self, a, weight_bits, scale, bias=None, activation="none", activation_min=float("-inf"), activation_max=float("inf")):
        dot = np.asarray(a, np.float64) @ ternary_weights(weight_bits, a.shape[1]).T
        return (epilogue_reference(dot, scale, bias, (1, -1), text_attribute(activation), activation_min, activation_max),)


def lower_ternary_conv(bb, inputs, attrs, target):
    """Run-time decode of the bit planes + Relax conv2d (CUDA: compile-time decode)."""
    from tvm import relax

    x, bits, scale, bias, x_shape, conv = conv_inputs("TernaryConv", inputs, attrs)
    _, _, activation, low, high = op_attributes("TernaryConv", attrs)
    per_group = x_shape[1] // conv["group"]
    if is_cuda(target):
        log.warning("TernaryConv on %s: weights decoded to float32 at compile time", target.spec)
        weight = relax.const(float_weight_hwio(bits, per_group, scale, 2, "sign"))
    else:
        weight = emit_decode(bb, x, bits, per_group, scale, 2, "sign", "edgec_ternary_decode")
    return emit_float_conv(bb, x, weight, conv, bias, (activation, low, high))


def lower_ternary_gemm(bb, inputs, attrs, target):
    """Run-time decode of the bit planes + Relax matmul (CUDA: compile-time decode)."""
    from tvm import relax

    a, bits, scale, bias, (_, depth) = gemm_inputs("TernaryGemm", inputs)
    _, _, activation, low, high = op_attributes("TernaryGemm", attrs)
    out_features = bits.shape[1]
    bits5 = bits.reshape(2, out_features, 1, 1, -1)
    if is_cuda(target):
        log.warning("TernaryGemm on %s: weights decoded to float32 at compile time", target.spec)
        weight = relax.const(float_weight_hwio(bits5, depth, scale, 2, "sign").reshape(depth, out_features))
    else:
        weight = emit_decode(bb, a, bits5, depth, scale, 2, "sign", "edgec_ternary_decode")
        weight = bb.emit(relax.op.reshape(weight, [depth, out_features]))
    return emit_float_gemm(bb, a, weight, bias, (activation, low, high))


register(CustomOp("TernaryConv", TernaryConv, lower_ternary_conv, "2-D convolution with 2-bit ternary weights"))
register(CustomOp("TernaryGemm", TernaryGemm, lower_ternary_gemm, "Gemm with 2-bit ternary weights"))
