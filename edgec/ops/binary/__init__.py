"""``edgec.BinaryConv`` and ``edgec.BinaryGemm``: layers whose weights are 1 bit per value.

    format.py     the bit planes, their codes (sign, magnitude) and re-packings
    reference.py  the NumPy references (the math)
    kernels.py    the TIR kernels: bit packing, xnor/popcount, run-time decode
    lowering.py   the Relax lowerings (CPU kernels, weight-only decode, CUDA fallback)

Ternary layers (edgec/ops/ternary) share the format's packing and the
weight-only path through their own two-plane ``WeightCode``.
"""

from edgec.ops import CustomOp, register
from edgec.ops.binary.lowering import lower_binary_conv, lower_binary_gemm
from edgec.ops.binary.reference import BinaryConv, BinaryGemm

register(CustomOp("BinaryConv", BinaryConv, lower_binary_conv, "2-D convolution with 1-bit weights (xnor/popcount)"))
register(CustomOp("BinaryGemm", BinaryGemm, lower_binary_gemm, "Gemm with 1-bit weights (xnor/popcount)"))
