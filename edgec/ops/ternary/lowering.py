"""Relax lowerings of ``edgec.TernaryConv`` and ``edgec.TernaryGemm``: binary's weight-only
path (run-time decode + Relax conv2d / matmul; CUDA: compile-time decode) with the
two-plane ``TERNARY`` code."""

from __future__ import annotations

from edgec.core.errors import BuildError
from edgec.ops.binary.lowering import coded_inputs, decoded_weight, emit_float_conv, emit_float_gemm
from edgec.ops.ternary.format import TERNARY
from edgec.ops.ternary.reference import TernaryConv, TernaryGemm

__all__ = ["lower_ternary_conv", "lower_ternary_gemm"]


def lower_ternary_conv(bb, inputs, attrs, target):
    """Run-time decode of the bit planes + Relax conv2d (CUDA: compile-time decode)."""
    x, x_shape, bits, scale, bias = coded_inputs("TernaryConv", inputs, "NCHW")
    attrs = TernaryConv.ATTRIBUTES.read("TernaryConv", attrs, BuildError)
    weight = decoded_weight(bb, "TernaryConv", x, bits, x_shape[1] // attrs.group, scale, TERNARY, target)
    return emit_float_conv(bb, x, weight, attrs, bias)


def lower_ternary_gemm(bb, inputs, attrs, target):
    """Run-time decode of the bit planes + Relax matmul (CUDA: compile-time decode)."""
    a, (_, depth), bits, scale, bias = coded_inputs("TernaryGemm", inputs, "(M, K)")
    attrs = TernaryGemm.ATTRIBUTES.read("TernaryGemm", attrs, BuildError)
    out_features = bits.shape[1]
    bits5 = bits.reshape(2, out_features, 1, 1, -1)
    weight = decoded_weight(bb, "TernaryGemm", a, bits5, depth, scale, TERNARY, target, (depth, out_features))
    return emit_float_gemm(bb, a, weight, attrs, bias)
