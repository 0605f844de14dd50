"""The block-sparse Winograd GEMM: the middle kernel of a 1xN block-sparse 3x3 stride-1
convolution computed as Winograd F(m x m, 3x3) (targets/schedules/winograd_sparse.py emits
the input and output transforms around it).

The Winograd weight transform ``U = G g G^T`` works on each (output channel, input channel)
3x3 kernel alone, so a pruned 1xN block (N output channels x 1 input channel x 3 x 3) is
zero after it and a kept one is a block of N x alpha x alpha values: each of the
``alpha^2`` tile-element GEMMs ``M[t] = V[t] U[t]`` is block-sparse with the conv's CSR
pattern (``indptr``, ``indices``), its own values::

    M[t, p, b*N + j] = sum_{k = indptr[b]}^{indptr[b+1]-1} V[t, p, indices[k]] * values[t, k, j]

``V`` ``[alpha^2, tiles, C_in]`` (the input transform's layout), ``values`` ``[alpha^2, nnz,
N]`` (N contiguous), ``M`` ``[alpha^2, tiles, C_out]`` (what the output transform reads). The
arrays are arguments, read at run time: the work is ``alpha^2 * tiles * nnz * N``
multiply-adds, a loop over the kept blocks only. The kernels take a ``bias`` too, the
accumulators' start (the convolution's bias comes after the output transform: zeros here).

Each tile element's GEMM is a 1x1 block-sparse convolution over the output tiles, so the
kernels are the pointwise ones', per element, chosen as the lowering chooses them:

- blocks narrower than the vector (x86: N=4 and N=8 with AVX-512, N=4 with AVX2): positions.py's
  kernel with ``elements = alpha^2``, a vector of consecutive output tiles per channel, the
  block's N weights broadcast;
- otherwise (NEON, where N=4 fills a register) :func:`winograd_gemm_kernel`. Loops, outermost
  first: a parallel loop over (tile element t, run of output tiles, block-row b), the kept
  blocks of the block-row (the reduction), then a register tile of ``positions`` output tiles
  (unrolled) x the block's N channels (vectorised): one load of the block's N weights,
  multiplied with one broadcast ``V`` value per output tile, as the direct 1xN kernel does
  (kernels.py). The tile's ``positions`` rows of ``V[t]`` stay in cache across the block-rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from edgec.ops.block_sparse.kernels import ConvShape, KernelPlan, even_tiles, kernel_plan
from edgec.ops.block_sparse.positions import positions_kernel, positions_plan
from edgec.targets.vector import CpuVector

__all__ = ["WinogradGemmShape", "winograd_gemm", "winograd_gemm_kernel", "winograd_gemm_reference"]


@dataclasses.dataclass(frozen=True)
class WinogradGemmShape:
    """Static shapes of one block-sparse Winograd GEMM: ``elements`` (alpha^2) GEMMs of
    ``[tiles x channels] x [channels x blocks*block_size]``, ``nnz`` kept blocks each."""

    elements: int
    tiles: int
    channels: int
    blocks: int
    block_size: int
    nnz: int

    @property
    def filters(self) -> int:
        return self.pointwise().out_channels

    @property
    def multiply_adds(self) -> int:
        return self.elements * self.pointwise().multiply_adds

    def pointwise(self) -> ConvShape:
        """One tile element's GEMM as a 1x1 convolution over one row of ``tiles`` positions."""
        return ConvShape(1, self.channels, 1, self.tiles, (1, 1), blocks=self.blocks, block_size=self.block_size, nnz=self.nnz)


def winograd_gemm(shape: WinogradGemmShape, vector: CpuVector):
    """The scheduled PrimFunc ``(V, values, indices, indptr, bias, M)`` for ``shape`` on
    ``vector`` (module docstring), its FLOPs recorded (``edgec.flops``)."""
    positions = positions_plan(shape.pointwise(), vector)
    if positions is not None:
        prim = positions_kernel(shape.pointwise(), positions, elements=shape.elements)
    else:
        prim = winograd_gemm_kernel(shape, kernel_plan(shape.block_size, shape.tiles, vector))
    return prim.with_attr("edgec.flops", 2.0 * shape.multiply_adds)


def winograd_gemm_reference(transformed_input: np.ndarray, values: np.ndarray, indices: np.ndarray,
                            indptr: np.ndarray) -> np.ndarray:
    """``M`` of the module docstring in float64, block by block: ``transformed_input``
    ``[alpha^2, tiles, C_in]``, ``values`` ``[alpha^2, nnz, N]``."""
    elements, tiles, _ = transformed_input.shape
    block_size = values.shape[2]
    blocks = indptr.size - 1
    out = np.zeros((elements, tiles, blocks * block_size))
    for block in range(blocks):
        for k in range(indptr[block], indptr[block + 1]):
            column = transformed_input[:, :, indices[k]].astype(np.float64)  # [alpha^2, tiles]
            out[:, :, block * block_size : (block + 1) * block_size] += column[:, :, None] * values[:, k, None, :]
    return out


def winograd_gemm_kernel(shape: WinogradGemmShape, plan: KernelPlan):
    """The scheduled PrimFunc ``(V, values, indices, indptr, bias, M)`` for ``shape`` (module docstring);
    ``plan.positions``: output tiles per register tile (``kernels.kernel_plan`` over the tiles)."""
    from tvm.script import tirx as T

    elements, tiles, channels = shape.elements, shape.tiles, shape.channels
    n, blocks, nnz, filters = shape.block_size, shape.blocks, shape.nnz, shape.filters
    runs, base, wide = even_tiles(tiles, plan.positions)

    @T.macro
    def register_tile(v, u, indices, indptr, bias, m, t, block, start, size):
        # ``size`` output tiles from ``start`` x the N channels of ``block``, at tile element ``t``
        acc = T.alloc_buffer((size, n), "float32")  # under STACK_TILE_BYTES: registers
        for p in T.unroll(size):
            for j in T.vectorized(n):
                acc[p, j] = bias[block * n + j]
        for k in range(indptr[block], indptr[block + 1]):
            for p in T.unroll(size):
                for j in T.vectorized(n):
                    acc[p, j] = acc[p, j] + u[t, k, j] * v[t, start + p, indices[k]]
        for p in T.unroll(size):
            for j in T.vectorized(n):
                m[t, start + p, block * n + j] = acc[p, j]

    @T.prim_func(private=True)
    def kernel(
        v: T.Buffer((elements, tiles, channels), "float32"),
        u: T.Buffer((elements, nnz, n), "float32"),
        indices: T.Buffer((nnz,), "int32"),
        indptr: T.Buffer((blocks + 1,), "int32"),
        bias: T.Buffer((filters,), "float32"),
        m: T.Buffer((elements, tiles, filters), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        # one parallel region: (tile element, run of output tiles, block-row)
        for task in T.parallel(elements * runs * blocks):
            if wide > 0 and task // blocks % runs < wide:
                register_tile(
                    v, u, indices, indptr, bias, m, task // (runs * blocks), task % blocks,
                    task // blocks % runs * (base + 1), base + 1,
                )  # fmt: skip
            else:
                register_tile(
                    v, u, indices, indptr, bias, m, task // (runs * blocks), task % blocks,
                    wide * (base + 1) + (task // blocks % runs - wide) * base, base,
                )  # fmt: skip

    return kernel
