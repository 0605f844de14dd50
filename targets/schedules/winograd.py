"""Winograd convolution F(m x m, 3 x 3): the math, in NumPy.

For a 3x3 convolution, stride 1, each ``m x m`` tile of the output comes from
an ``alpha x alpha`` tile of the (padded) input, ``alpha = m + 2``, tiles
overlapping by 2 (Lavin and Gray, arXiv 1509.09308):

    U = G g G^T                  weights, per (input channel c, filter f): alpha x alpha
    V = B^T d B                  input tile, per channel c:                alpha x alpha
    M[t] = sum_c V[t, c] U[t, c, f]   one matrix product per tile element t = (eps, nu)
    Y = A^T M A                  output tile, per filter f:                m x m

``A`` (alpha x m), ``B`` (alpha x alpha), ``G`` (alpha x 3) are TVM's Cook-Toom
matrices (``tvm.topi.nn.winograd_util``), whose interpolation points
(0, -1, 1, 1/2, -2 for m = 4) were chosen for float32 accuracy (Barabasz et al.,
arXiv 1803.10986). F(4x4, 3x3) does 36 multiplies per 16 outputs where direct
convolution does 144: 4x fewer; F(2x2, 3x3) 16 per 4: 2.25x fewer.

Layouts are edgec's channels-last ones: data NHWC, weights HWIO; the
transformed weights are ``[alpha*alpha, C, F]`` (F contiguous, what the GEMM
vectorises) and the transformed input ``[alpha*alpha, tiles, C]``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

KERNEL = 3


@dataclasses.dataclass(frozen=True)
class WinogradMatrices:
    """The transforms of F(m x m, 3 x 3) in float64: ``A`` alpha x m, ``B`` alpha x alpha, ``G`` alpha x 3."""

    m: int
    A: np.ndarray
    B: np.ndarray
    G: np.ndarray

    @property
    def alpha(self) -> int:
        return self.m + KERNEL - 1


@functools.cache
def winograd_matrices(m: int) -> WinogradMatrices:
    """The Cook-Toom matrices of F(m x m, 3 x 3) for output tiles of ``m`` (2..6)."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    if not 2 <= m <= 6:
        raise ValueError(f"Winograd output tile must be 2..6, not {m}")
    A, B, G = _cook_toom_convolution(_interpolation_points(m + KERNEL - 2), m, KERNEL)
    return WinogradMatrices(m, np.asarray(A, np.float64), np.asarray(B, np.float64), np.asarray(G, np.float64))


def transform_terms(m: int) -> tuple[int, int]:
    """Terms (multiply-adds, +-1 ones as adds) per tile of the separable transforms of F(m x m, 3x3),
    the matrices' zeros dropped: the input transform's per channel, ``2 alpha nnz(B)`` (one pass
    per axis), and the output transform's per filter, ``(alpha + m) nnz(A)``."""
    mats = winograd_matrices(m)
    return 2 * mats.alpha * int(np.count_nonzero(mats.B)), (mats.alpha + m) * int(np.count_nonzero(mats.A))


def transform_weights(weight_hwio: np.ndarray, m: int) -> np.ndarray:
    """``U[eps*alpha + nu, c, f] = sum_ij G[eps, i] w[i, j, c, f] G[nu, j]`` for HWIO 3x3 weights,
    computed in float64 and returned in the weights' dtype."""
    if weight_hwio.shape[:2] != (KERNEL, KERNEL):
        raise ValueError(f"Winograd weights must be 3x3 HWIO, not {weight_hwio.shape}")
    G = winograd_matrices(m).G
    transformed = np.einsum("ai,ijcf,bj->abcf", G, weight_hwio.astype(np.float64), G)
    alpha = G.shape[0]
    return transformed.reshape(alpha * alpha, *weight_hwio.shape[2:]).astype(weight_hwio.dtype)


def tile_counts(height: int, width: int, m: int) -> tuple[int, int]:
    """Tiles of ``m x m`` covering an output of ``height x width`` (the last row/column may be partial)."""
    return -(-height // m), -(-width // m)


def winograd_conv2d_reference(data_nhwc: np.ndarray, weight_hwio: np.ndarray, padding: tuple[int, int, int, int],
                              m: int) -> np.ndarray:
    """The whole algorithm in NumPy (float64): what the compiled kernels compute, for tests.
    ``padding`` is (top, left, bottom, right)."""
    top, left, bottom, right = padding
    mats = winograd_matrices(m)
    batch, height, width, _ = data_nhwc.shape
    out_h, out_w = height + top + bottom - 2, width + left + right - 2
    tiles_h, tiles_w = tile_counts(out_h, out_w, m)
    alpha = mats.alpha
    padded = np.zeros((batch, tiles_h * m + 2, tiles_w * m + 2, data_nhwc.shape[3]))
    rows, cols = min(height, padded.shape[1] - top), min(width, padded.shape[2] - left)
    padded[:, top : top + rows, left : left + cols] = data_nhwc[:, :rows, :cols]
    U = transform_weights(weight_hwio.astype(np.float64), m).reshape(alpha, alpha, *weight_hwio.shape[2:])
    out = np.zeros((batch, tiles_h * m, tiles_w * m, weight_hwio.shape[3]))
    for ty in range(tiles_h):
        for tx in range(tiles_w):
            d = padded[:, ty * m : ty * m + alpha, tx * m : tx * m + alpha]  # n, alpha, alpha, c
            V = np.einsum("ia,nijc,jb->nabc", mats.B, d, mats.B)
            M = np.einsum("nabc,abcf->nabf", V, U)
            out[:, ty * m : ty * m + m, tx * m : tx * m + m] = np.einsum("ai,nabf,bj->nijf", mats.A, M, mats.A)
    return out[:, :out_h, :out_w]
