"""``edgec.TernaryConv`` and ``edgec.TernaryGemm``: layers whose weights are 2 bits per value.

    format.py     the two bit planes and their code
    reference.py  the NumPy references (the math)
    lowering.py   the Relax lowerings: binary's weight-only path with the ternary code

Kernel (CPU): weight-only. The bit planes stay packed in the artifact and
``edgec_ternary_decode`` (edgec/ops/binary/kernels.py's ``decode_kernel`` fed
the two-plane ``TERNARY`` code) expands them at run time into float32
``scale * t`` in HWIO layout, followed by Relax's ``conv2d`` / ``matmul``,
which the CPU schedules handle as any float layer: the cost is the float
layer's plus the decode. CUDA: decoded at compile time to a dense float32
weight (a warning is logged).
"""

from edgec.ops import CustomOp, register
from edgec.ops.ternary.lowering import lower_ternary_conv, lower_ternary_gemm
from edgec.ops.ternary.reference import TernaryConv, TernaryGemm

register(CustomOp("TernaryConv", TernaryConv, lower_ternary_conv, "2-D convolution with 2-bit ternary weights"))
register(CustomOp("TernaryGemm", TernaryGemm, lower_ternary_gemm, "Gemm with 2-bit ternary weights"))
