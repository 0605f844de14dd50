"""``edgec.BlockSparseConv`` and ``edgec.BlockSparseGemm``: a convolution / Gemm whose weight
is 1xN block-sparse, computed over the kept blocks only, with the bias and activation fused.

    format.py     the packed arrays (CSR over blocks of N output channels)
    reference.py  the NumPy references (the math)
    kernels.py    the TIR kernels (conv, gemm), register-tiled for the target's vectors
    positions.py  the 1x1 conv kernel vectorised over positions (N narrower than the vector)
    lowering.py   the Relax lowerings (CPU kernels, CUDA dense fallback)
"""

from edgec.ops import CustomOp, register
from edgec.ops.block_sparse.lowering import lower_block_sparse_conv, lower_block_sparse_gemm
from edgec.ops.block_sparse.reference import BlockSparseConv, BlockSparseGemm

register(
    CustomOp(
        "BlockSparseConv",
        BlockSparseConv,
        lower_block_sparse_conv,
        "2-D convolution with a 1xN block-sparse weight (kept blocks only), fused bias and activation",
    )
)
register(
    CustomOp(
        "BlockSparseGemm",
        BlockSparseGemm,
        lower_block_sparse_gemm,
        "Gemm with a 1xN block-sparse weight (kept blocks only), fused bias and activation",
    )
)
