"""The block-sparse Winograd GEMM (edgec/ops/block_sparse/winograd_gemm.py): its NumPy
reference against dense per-element GEMMs of the unpacked weights, the compiled kernels
against the reference (the N-vectorised one over every tile run shape: full, partial, one
tile; the positions-vectorised one, x86's for blocks narrower than the vector, per element
with partial position tiles), and that the work is the kept blocks' only: the reduction
loop runs indptr[b] .. indptr[b+1], a pruned block is never visited, a block-row with none
kept writes its bias."""

from __future__ import annotations

import numpy as np
import pytest

from edgec.ops.block_sparse.format import unpack_blocks
from edgec.ops.block_sparse.kernels import KernelPlan, kernel_plan
from edgec.ops.block_sparse.winograd_gemm import WinogradGemmShape, winograd_gemm, winograd_gemm_kernel, winograd_gemm_reference
from edgec.targets.vector import CpuVector
from sparse_graphs import random_blocks
from test_block_sparse_ops import multiply_adds  # tests/ops is on the path (pytest prepends it)

RTOL, ATOL = 1e-5, 1e-5  # float32 sums of a few dozen products against float64
NEON = CpuVector(lanes=4, registers=16)
AVX2, AVX512 = CpuVector(lanes=8, registers=16), CpuVector(lanes=16, registers=32)


def gemm_case(seed: int, elements: int, tiles: int, channels: int, filters: int, n: int, keep: float = 0.3):
    """(V, values [alpha^2, nnz, N], indices, indptr, bias) of a random block-sparse GEMM."""
    rng = np.random.default_rng(seed)
    _, indices, indptr = random_blocks(rng, filters, channels, n, keep=keep)
    values = rng.standard_normal((elements, indices.size, n)).astype(np.float32)
    transformed_input = rng.standard_normal((elements, tiles, channels)).astype(np.float32)
    return transformed_input, values, indices, indptr, rng.standard_normal(filters).astype(np.float32)


def reference(transformed_input, values, indices, indptr, bias):
    return winograd_gemm_reference(transformed_input, values, indices, indptr) + bias


def run_kernel(prim, arrays, out_shape) -> np.ndarray:
    import tvm

    library = tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}), target="llvm")
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    library["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays], out)
    return out.numpy()


def test_reference_is_a_dense_gemm_per_tile_element():
    transformed_input, values, indices, indptr, _ = gemm_case(0, 4, 7, 12, 16, 4)
    got = winograd_gemm_reference(transformed_input, values, indices, indptr)
    for t in range(4):
        dense = unpack_blocks(values[t], indices, indptr, 12)  # (filters, channels)
        np.testing.assert_allclose(got[t], transformed_input[t].astype(np.float64) @ dense.T.astype(np.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("tiles", "n", "positions"),
    [(49, 4, 12), (36, 4, 12), (5, 4, 12), (1, 4, 12), (16, 8, 6), (20, 16, 3)],
    ids=["runs-of-12-and-11", "three-full-runs", "one-partial-run", "one-tile", "n8", "n16"],
)
def test_compiled_kernel_equals_reference(tiles, n, positions):
    arrays = gemm_case(tiles, 16, tiles, 20, 32, n)
    shape = WinogradGemmShape(16, tiles, 20, 32 // n, n, arrays[2].size)
    got = run_kernel(winograd_gemm_kernel(shape, KernelPlan(4, positions)), arrays, (16, tiles, 32))
    np.testing.assert_allclose(got, reference(*arrays), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("vector", "tiles", "channels", "n"), [(AVX512, 49, 20, 4), (AVX512, 16, 64, 8), (AVX2, 13, 18, 4),
                                                                (AVX2, 3, 8, 4)])  # fmt: skip
def test_narrow_blocks_take_the_positions_kernel_per_element(vector, tiles, channels, n):
    """x86's blocks narrower than the vector: positions.py's kernel, one vector of output tiles
    per channel, each element's tiles apart (49 = 3 x 16 + 1: a partial last tile per element)."""
    arrays = gemm_case(channels + tiles, 16, tiles, channels, 32, n)
    shape = WinogradGemmShape(16, tiles, channels, 32 // n, n, arrays[2].size)
    prim = winograd_gemm(shape, vector)
    assert prim.attrs["edgec.flops"] == 2 * shape.multiply_adds
    assert "xt" in prim.script()  # the channel-major tile of positions.py
    np.testing.assert_allclose(run_kernel(prim, arrays, (16, tiles, 32)), reference(*arrays), rtol=RTOL, atol=ATOL)


def test_neon_keeps_the_n_vectorised_kernel():
    shape = WinogradGemmShape(36, 196, 64, 16, 4, 300)
    assert winograd_gemm(shape, NEON).script() == winograd_gemm_kernel(shape, KernelPlan(4, 12)).with_attr(
        "edgec.flops", 2.0 * shape.multiply_adds).script()  # fmt: skip


def test_block_row_with_no_kept_block_writes_its_bias():
    transformed_input, values, indices, indptr, bias = gemm_case(3, 9, 10, 8, 16, 4, keep=0.6)
    # drop block-row 1's blocks: its indptr run becomes empty
    kept = np.ones(indices.size, bool)
    kept[indptr[1] : indptr[2]] = False
    counts = np.diff(indptr)
    counts[1] = 0
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    indices, values = indices[kept], values[:, kept]
    shape = WinogradGemmShape(9, 10, 8, 4, 4, indices.size)
    arrays = (transformed_input, values, indices, indptr, bias)
    got = run_kernel(winograd_gemm_kernel(shape, KernelPlan(4, 12)), arrays, (9, 10, 16))
    np.testing.assert_array_equal(got[:, :, 4:8], np.broadcast_to(bias[4:8], (9, 10, 4)))
    np.testing.assert_allclose(got, reference(*arrays), rtol=RTOL, atol=ATOL)


def test_work_is_the_kept_blocks_only():
    """Counted on the loop nest with its bounds evaluated on the real indptr: exactly
    alpha^2 x tiles x nnz x N multiply-adds, so 3x the kept blocks cost 3x, and the
    reduction loop's bounds are loads of indptr (no loop over every input channel)."""
    counts = {}
    for keep in (0.2, 0.6):
        rng = np.random.default_rng(5)
        blocks, channels, n, tiles, elements = 4, 30, 4, 13, 16
        mask = np.zeros(blocks * channels, bool)
        mask[rng.permutation(blocks * channels)[: int(keep * blocks * channels)]] = True
        mask = mask.reshape(blocks, channels)
        indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
        indices = np.nonzero(mask)[1].astype(np.int32)
        shape = WinogradGemmShape(elements, tiles, channels, blocks, n, indices.size)
        prim = winograd_gemm_kernel(shape, kernel_plan(n, tiles, NEON))
        counts[keep] = multiply_adds(prim, {"indptr": indptr, "indices": indices})
        assert counts[keep] == elements * tiles * indices.size * n == shape.multiply_adds
    assert counts[0.6] == 3 * counts[0.2]

    assert any("indptr" in str(loop.min) and "indptr" in str(loop.extent) for loop in loops(prim.body))


def loops(stmt) -> list:
    """Every For of a TIR statement."""
    from tvm import tirx

    found = [stmt] if isinstance(stmt, tirx.For) else []
    children = stmt.seq if isinstance(stmt, tirx.SeqStmt) else [getattr(stmt, name, None) for name in ("body", "then_case", "else_case")]
    for child in children:
        if isinstance(child, tirx.Stmt):
            found += loops(child)
    return found


def test_register_tile_fills_neon_accumulators():
    """N=4 fills one NEON register: 12 output tiles (12 accumulators of 16 registers) per register tile."""
    assert kernel_plan(4, 196, NEON) == KernelPlan(4, 12)
    assert kernel_plan(4, 5, NEON) == KernelPlan(4, 5)
