"""The positions-vectorised kernel of edgec.BlockSparseConv (edgec/ops/block_sparse/positions.py):
which layers and targets take it, its numerics against the NumPy reference (channel counts and
position counts that do not fill a group or a tile, stride 2, batch 2, N=4 and N=8, 3x3 and 7x7
windows with padding, dilation, a 3-channel stem, AVX-512 and AVX2 tiles; rtol 1e-4, atol 1e-5),
that its work is the kept blocks', and what LLVM makes of it."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import pytest

import edgec
from edgec.ops.block_sparse.kernels import ConvShape
from edgec.ops.block_sparse.positions import PositionsPlan, positions_kernel, positions_plan
from edgec.runtimes.reference import run_numpy_reference
from edgec.targets.vector import CpuVector, cpu_vector
from test_block_sparse_ops import ATOL, RTOL, AVX512, conv_models, multiply_adds  # tests/ops is on the path

AVX2 = CpuVector(lanes=8, registers=16)
NEON = CpuVector(lanes=4, registers=32)


def shape_of(x_shape, out_channels, n, kernel=(1, 1), strides=(1, 1), pads=(0, 0, 0, 0), nnz=1, dilations=(1, 1)) -> ConvShape:
    batch, channels, height, width = x_shape
    return ConvShape(batch, channels, height, width, kernel, strides, pads, dilations, blocks=out_channels // n, block_size=n, nnz=nnz)


def test_plan_only_where_blocks_are_narrower_than_the_vector():
    pointwise = {n: shape_of((1, 32, 8, 8), 32, n) for n in (2, 4, 8, 16)}
    assert positions_plan(pointwise[4], AVX512) == PositionsPlan(16, 1)  # 16 positions x 4 channels
    assert positions_plan(pointwise[8], AVX512) == PositionsPlan(16, 1)
    assert positions_plan(pointwise[4], AVX2) == PositionsPlan(8, 1)
    assert positions_plan(pointwise[16], AVX512) is None  # N fills the vector: the N-vectorised kernel
    assert positions_plan(pointwise[8], AVX2) is None
    assert positions_plan(pointwise[4], NEON) is None  # ARM keeps its kernel (and its instruction counts)
    assert positions_plan(pointwise[2], AVX512) is None  # N not a multiple of the 4-channel transposes
    assert positions_plan(shape_of((1, 32, 8, 8), 32, 4, kernel=(3, 3), pads=(1, 1, 1, 1)), AVX512) == PositionsPlan(16, 1)
    assert positions_plan(shape_of((1, 3, 8, 8), 32, 4, kernel=(7, 7), strides=(2, 2), pads=(3, 3, 3, 3)), AVX2) == PositionsPlan(8, 1)
    assert positions_plan(shape_of((1, 32, 8, 8), 32, 4, pads=(1, 1, 1, 1)), AVX512) == PositionsPlan(16, 1)
    assert positions_plan(shape_of((1, 32, 8, 8), 32, 4, kernel=(3, 3), pads=(1, 1, 1, 1)), NEON) is None
    assert positions_plan(shape_of((1, 32, 8, 8), 32, 4, strides=(2, 2)), AVX512) == PositionsPlan(16, 1)


def lowered_kernels(model, preset: str) -> list[str]:
    """The scripts of the block-sparse conv PrimFuncs of ``model`` lowered for ``preset``."""
    from edgec.lower import to_relax
    from edgec.targets import resolve

    mod = to_relax(model, resolve(preset))
    return [func.script() for gvar, func in mod.functions.items() if gvar.name_hint.startswith("edgec_block_sparse_conv")]


@pytest.mark.parametrize(
    ("preset", "kernel", "n", "positions"),
    [("x86", (1, 1), 4, True), ("x86", (1, 1), 8, True), ("x86", (1, 1), 16, False), ("x86", (3, 3), 4, True),
     ("x86", (3, 3), 16, False), ("cortex-a53", (3, 3), 4, False),
     ("cortex-a7", (1, 1), 4, False), ("cortex-a53", (1, 1), 4, False)],
)  # fmt: skip
def test_lowering_chooses_the_kernel(preset, kernel, n, positions):
    from edgec.targets import resolve

    pads = (0, 0, 0, 0) if kernel == (1, 1) else (1, 1, 1, 1)
    sparse, _ = conv_models((1, 16, 6, 6), 16, n, kernel, (1, 1), pads, (1, 1), "Relu")
    (script,) = lowered_kernels(sparse, preset)
    lanes = cpu_vector(resolve(preset)).lanes
    want = positions and n < lanes  # x86 hosts without AVX-512 have 8 lanes (or 4)
    assert ('"xt"' in script or "xt = " in script) == want, script[:400]


class Case(NamedTuple):
    """One conv: C_out in runs of `lanes` channels, then the block-rows left."""

    x_shape: tuple[int, int, int, int]
    out_channels: int
    n: int
    stride: int
    activation: str
    kernel: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)


CASES = {
    "7x7-cin96": Case((1, 96, 7, 7), 24, 4, 1, "Clip"),  # 49 positions: one full tile of 32, one of 17
    "14x14-cin18": Case((1, 18, 14, 14), 20, 4, 1, "Relu"),  # C_in % 4 = 2: two gathered channels
    "batch2-n8": Case((2, 30, 5, 5), 40, 8, 1, "none"),
    "stride2": Case((1, 64, 13, 13), 32, 4, 2, "Clip"),  # 7x7 outputs from every other input position
    "full-tiles": Case((1, 16, 8, 8), 16, 4, 1, "Relu"),  # 64 positions: no partial tile
    "no-full-run": Case((1, 12, 5, 5), 8, 4, 1, "Clip"),  # C_out 8 < 16 lanes: 128-bit stores only
    "no-full-tile": Case((1, 20, 3, 3), 16, 4, 1, "Relu"),  # 9 positions: the partial tile alone
    "3x3-pad": Case((1, 22, 7, 7), 24, 4, 1, "Relu", (3, 3), (1, 1, 1, 1)),  # ResNet-18's last stage, smaller
    "3x3-stride2-batch2": Case((2, 16, 9, 10), 16, 8, 2, "Clip", (3, 3), (1, 1, 1, 1)),
    "3x3-unpadded": Case((1, 8, 6, 9), 20, 4, 1, "none", (3, 3), (0, 0, 0, 0)),
    "5x3-dilated-asym-pad": Case((1, 12, 11, 12), 16, 4, 1, "Clip", (5, 3), (2, 1, 2, 0), (2, 1)),
    "7x7-stem": Case((1, 3, 20, 20), 32, 4, 2, "Relu", (7, 7), (3, 3, 3, 3)),  # ResNet-18's stem: 3 gathered channels
}


def case_models(case: Case):
    """(sparse model, dense model, its ConvShape with nnz 1) of ``case``."""
    strides = (case.stride, case.stride)
    sparse, dense = conv_models(case.x_shape, case.out_channels, case.n, case.kernel, strides, case.pads, case.dilations, case.activation)
    return sparse, dense, shape_of(case.x_shape, case.out_channels, case.n, case.kernel, strides, case.pads, dilations=case.dilations)


def run_kernel(prim, arrays):
    import tvm

    from edgec.stack_buffers import tir_pipeline
    from edgec.targets.host import host_cpu_name

    target = tvm.target.Target({"kind": "llvm", "mcpu": host_cpu_name()})
    lib = tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}), target=target, tir_pipeline=tir_pipeline())
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(array), tvm.cpu()) for array in arrays]
    lib["main"](*tensors)
    return tensors[-1].numpy()


PLANS = {"avx512": PositionsPlan(16, 1), "avx512-2-vectors": PositionsPlan(16, 2), "avx2": PositionsPlan(8, 1)}


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_reference(case, plan):
    case, plan = CASES[case], PLANS[plan]
    x_shape = case.x_shape
    sparse, _, shape = case_models(case)
    if shape.block_size >= plan.lanes:
        pytest.skip("N fills this vector: not this kernel's")
    inits = sparse.graph.initializers
    values, indices, indptr, bias = (inits[name].const_value.numpy() for name in ("v", "i", "p", "b"))
    shape = dataclasses.replace(shape, nnz=indices.size)
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    (want,) = run_numpy_reference(sparse, [x])
    y = np.zeros((x_shape[0], shape.out_height, shape.out_width, shape.out_channels), np.float32)
    arrays = [x.transpose(0, 2, 3, 1), values.transpose(0, 2, 3, 1), indices, indptr, bias, y]  # as the lowering passes them
    got = run_kernel(positions_kernel(shape, plan, case.activation, 0.0, 6.0), arrays)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", ["7x7-cin96", "stride2", "3x3-pad", "7x7-stem"])
def test_compiled_model_verifies(case, tmp_path):
    sparse, _, _ = case_models(CASES[case])
    result = edgec.compile(edgec.from_onnx_ir(sparse), "x86", tmp_path / "a")
    verification = result.manifest["verification"]
    assert verification["status"] == "passed" and verification["numpy"]["enforced"]
    assert verification["numpy"]["max_abs"] < 1e-4


def test_work_is_the_kept_blocks():
    rng = np.random.default_rng(0)
    counts = {}
    for keep in (0.25, 0.75):
        mask = rng.random((8, 24)) < keep
        indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
        indices = np.nonzero(mask)[1].astype(np.int32)
        shape = shape_of((1, 24, 8, 8), 32, 4, nnz=indices.size)
        prim = positions_kernel(shape, positions_plan(shape, AVX512), "Relu")
        counts[keep] = multiply_adds(prim, {"indptr": indptr, "indices": indices})
        assert counts[keep] == indices.size * 4 * 64 == shape.multiply_adds  # 64 positions: four full tiles
    assert counts[0.75] > 2 * counts[0.25]
    strided = dataclasses.replace(shape, height=10, width=10, kernel=(3, 3), pads=(1, 1, 1, 1), strides=(2, 2))
    prim = positions_kernel(strided, positions_plan(strided, AVX512), "Relu")
    # 5x5 outputs: a full tile of 16 and a partial one, whose 9 positions cost a whole tile
    assert multiply_adds(prim, {"indptr": indptr, "indices": indices}) == indices.size * 4 * 9 * 32
    assert strided.multiply_adds == indices.size * 4 * 9 * 25


@pytest.mark.parametrize("window", [(1, 1), (3, 3)])
def test_assembly_fma_tile_and_vector_transposes(window):
    """AVX-512: each kept block is, per tap, 4 zmm FMAs on 1 load of x (16 positions) and 4
    broadcast weights; the transposes are shuffles, and y is stored a whole position's 16
    channels (the first 16 of 24) or 4 (the last 8) at a time, never one float at a time."""
    import re

    import tvm

    pads = tuple(k // 2 for k in window) * 2
    shape = shape_of((1, 96, 16, 16), 24, 4, kernel=window, pads=pads, nnz=200)
    prim = positions_kernel(shape, positions_plan(shape, AVX512), "Clip", 0.0, 6.0)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    asm = tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}), target=target).mod.inspect_source("s")
    loops = re.split(r"\n\.LBB\d+_\d+:", asm)
    fma_loops = [body for body in loops if body.count("vfmadd231ps") >= 4 and re.search(r"\bj\w+\s+\.LBB", body)]
    assert fma_loops, "no FMA loop"
    body = min(fma_loops, key=len)  # the kept-block loop (possibly unrolled by LLVM)
    fmas = len(re.findall(r"vfmadd231ps\s+[^\n]*%zmm\d+\n", body))
    loads = len(re.findall(r"vmovups\s+[^,\n]*\(%\w+[^\n]*%zmm", body))
    broadcasts = body.count("vbroadcastss") + len(re.findall(r"\{1to16\}", body))
    assert fmas % 4 == 0 and fmas == 4 * loads == broadcasts, body
    assert "vunpcklps" in asm and "vunpckhps" in asm
    assert not re.search(r"vmovss\s+%xmm\d+, [^\n]*\(", asm)  # no scalar stores
