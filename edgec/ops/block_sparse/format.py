"""The 1xN block-sparse weight format (arXiv 2105.14713).

Conv: the weight ``W`` (``C_out x C_in x kh x kw``, ``C_out = B * N``) is cut
into blocks of ``N`` consecutive output channels at one input channel,
``W[b*N:(b+1)*N, c, :, :]``. Only the kept blocks are stored, block-row by
block-row (CSR over blocks)::

    indptr   int32 (B + 1,)         block-row b holds blocks indptr[b] .. indptr[b+1]-1
    indices  int32 (nnz,)           the input channel of each kept block
    values   float32 (nnz, N, kh, kw)   the block's N x kh x kw weights
    bias     float32 (C_out,)       always present (zeros when the Conv had none)

so ``W[b*N + j, indices[k], :, :] = values[k, j]`` for ``indptr[b] <= k <
indptr[b+1]`` and every other weight is 0. Gemm: ``W`` is ``(C_out, K)`` (a
Gemm's ``B`` with ``transB=1``, ``alpha`` folded in), blocks are ``N``
consecutive output features at one input feature, ``values`` is ``(nnz, N)``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["unpack_blocks"]


def unpack_blocks(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, in_channels: int) -> np.ndarray:
    """The dense weight the packed arrays stand for: ``(B*N, in_channels, *values.shape[2:])``.

    ``values`` is ``(nnz, N, ...)``; pruned blocks are zeros.
    """
    values = np.asarray(values)
    indices = np.asarray(indices, dtype=np.int64)
    indptr = np.asarray(indptr, dtype=np.int64)
    blocks = indptr.size - 1
    block_size = values.shape[1]
    tail = values.shape[2:]
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != indices.size or indices.size != values.shape[0]:
        raise ValueError(
            f"inconsistent block-sparse arrays: indptr {indptr.tolist()[:8]}..., {indices.size} indices, "
            f"{values.shape[0]} blocks of values"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= in_channels):
        raise ValueError(f"block indices out of range for {in_channels} input channels")
    dense = np.zeros((blocks, in_channels, block_size, *tail), dtype=values.dtype)
    rows = np.repeat(np.arange(blocks), np.diff(indptr))
    dense[rows, indices] = values
    dense = np.moveaxis(dense, 2, 1)  # (B, N, C, ...)
    return dense.reshape(blocks * block_size, in_channels, *tail)
