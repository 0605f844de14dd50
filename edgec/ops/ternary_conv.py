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

import numpy as np

from edgec.errors import BuildError
from edgec.ops import CustomOp, register
from edgec.ops.binary_conv import coded_inputs, decoded_weight, emit_float_conv, emit_float_gemm, epilogue_reference, unpack_bits
from edgec.ops.common import ACTIVATION_ATTRIBUTES, CONV_ATTRIBUTES, Reference, check_kernel_shape, conv2d_nchw

__all__ = ["TernaryConv", "TernaryGemm", "ternary_weights"]


def ternary_weights(weight_bits: np.ndarray, count: int) -> np.ndarray:
    """``(2, O, ..., ceil(count/8))`` bit planes -> ``t`` float64 ``(O, ..., count)`` in {-1, 0, +1}."""
    planes = unpack_bits(weight_bits, count).astype(np.float64)
    if planes.shape[0] != 2:
        raise ValueError(f"ternary weight bits need 2 planes (nonzero, negative), got {planes.shape[0]}")
    return planes[0] * (1.0 - 2.0 * planes[1])


class TernaryConv(Reference):
    """NumPy reference: ``act(conv(x, t) * scale + bias)``, see the module docstring."""

    ATTRIBUTES = CONV_ATTRIBUTES | ACTIVATION_ATTRIBUTES

    def compute(self, attrs, x, weight_bits, scale, bias=None):
        unit = np.moveaxis(ternary_weights(weight_bits, x.shape[1] // attrs.group), 3, 1)  # (O, C/g, kh, kw)
        check_kernel_shape(attrs, unit.shape[2:], "weight bits")
        dot = conv2d_nchw(x, unit, attrs.strides, attrs.pads, attrs.dilations, attrs.group)
        return epilogue_reference(dot, scale, bias, (1, -1, 1, 1), attrs)


class TernaryGemm(Reference):
    """NumPy reference: ``act(A @ t^T * scale + bias)``."""

    ATTRIBUTES = ACTIVATION_ATTRIBUTES

    def compute(self, attrs, a, weight_bits, scale, bias=None):
        dot = np.asarray(a, np.float64) @ ternary_weights(weight_bits, a.shape[1]).T
        return epilogue_reference(dot, scale, bias, (1, -1), attrs)


def lower_ternary_conv(bb, inputs, attrs, target):
    """Run-time decode of the bit planes + Relax conv2d (CUDA: compile-time decode)."""
    x, x_shape, bits, scale, bias = coded_inputs("TernaryConv", inputs, "NCHW")
    attrs = TernaryConv.ATTRIBUTES.read("TernaryConv", attrs, BuildError)
    weight = decoded_weight(bb, "TernaryConv", x, bits, x_shape[1] // attrs.group, scale, "sign", target)
    return emit_float_conv(bb, x, weight, attrs, bias)


def lower_ternary_gemm(bb, inputs, attrs, target):
    """Run-time decode of the bit planes + Relax matmul (CUDA: compile-time decode)."""
    a, (_, depth), bits, scale, bias = coded_inputs("TernaryGemm", inputs, "(M, K)")
    attrs = TernaryGemm.ATTRIBUTES.read("TernaryGemm", attrs, BuildError)
    out_features = bits.shape[1]
    bits5 = bits.reshape(2, out_features, 1, 1, -1)
    weight = decoded_weight(bb, "TernaryGemm", a, bits5, depth, scale, "sign", target, (depth, out_features))
    return emit_float_gemm(bb, a, weight, attrs, bias)


register(CustomOp("TernaryConv", TernaryConv, lower_ternary_conv, "2-D convolution with 2-bit ternary weights"))
register(CustomOp("TernaryGemm", TernaryGemm, lower_ternary_gemm, "Gemm with 2-bit ternary weights"))
