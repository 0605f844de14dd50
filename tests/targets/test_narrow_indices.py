"""``schedules.narrow_indices``: kernels legalized with int64 shapes are narrowed to
int32 indices before the schedule rules run, because TVM's NarrowDataType (in
the default TIR pipeline, before LoopPartition) rebuilds int64 loops without
their annotations and so dropped the ``pragma_loop_partition_hint`` of the
depthwise, pooling and padding schedules. Checked: the dtypes, the guard for
buffers of 2**31 elements or more, the numbers, and that the border tiles are
split off after TVM's own passes (with the few-channel padded copy's hints), and an x86
stem build whose padded copy has no gather left.
"""

from __future__ import annotations

import re

import pytest

from backbone import disassembly, make_onnx, needs_objdump
from edgec.targets.schedules import default_rules, narrow_indices, schedule_func
from edgec.targets.vector import CpuVector
from test_schedules import assert_computes_the_same  # tests/targets is on the path

NEON64 = CpuVector(lanes=4, registers=32, lane_fma=True, max_number=True)


def _i64(value: int):
    from tvm import tirx

    return tirx.IntImm("int64", value)


def padded_rgb_kernel(size=32):
    """Relax's legalized padding of an RGB image, int64 shapes (as in a model's stem)."""
    from tvm import te, topi

    data = te.placeholder((_i64(1), _i64(size), _i64(size), _i64(3)), name="x")
    return te.create_prim_func([data, topi.nn.pad(data, [0, 1, 1, 0], [0, 1, 1, 0], name="pad_temp")])


def max_pool_kernel_int64(size=28, channels=24):
    from tvm import te, topi

    data = te.placeholder((_i64(1), _i64(size), _i64(size), _i64(channels)), name="x")
    out = topi.nn.pool2d(data, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), "max", layout="NHWC")
    return te.create_prim_func([data, out])


def _index_dtypes(func) -> set[str]:
    import tvm_ffi
    from tvm import tirx

    found: set[str] = set()
    tvm_ffi.structural_walk(func.body, [(tirx.For, lambda loop: found.add(str(loop.loop_var.ty)))], order="post")
    return found


def test_int64_kernels_are_narrowed_to_int32():
    func = max_pool_kernel_int64()
    assert "int64" in _index_dtypes(func)
    assert _index_dtypes(narrow_indices(func)) == {"int32"}


def test_buffers_of_two_to_the_31_elements_stay_int64():
    from tvm import te, topi

    data = te.placeholder((_i64(1), _i64(65536), _i64(32768), _i64(2)), name="x")  # 2**32 elements
    func = te.create_prim_func([data, topi.nn.relu(data)])
    assert narrow_indices(func).same_as(func)


def _lowered_like_tvm(func) -> str:
    """``func`` through TVM's default TIR pipeline up to LoopPartition, NarrowDataType included."""
    import tvm
    from tvm import s_tir, tirx

    passes = [
        s_tir.transform.CanonicalizeLoop(), s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(), s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(), s_tir.transform.LowerMatchBuffer(), s_tir.transform.StmtSimplify(),
        s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(), tirx.transform.NarrowDataType(32),
        s_tir.transform.LoopPartition(), tirx.transform.StmtSimplify(),
    ]  # fmt: skip
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    for transform in passes:
        mod = transform(mod)
    return mod["main"].script()


@pytest.mark.parametrize("kernel", [padded_rgb_kernel, max_pool_kernel_int64], ids=["pad-rgb", "maxpool"])
def test_border_partition_survives_tvm_pipeline_once_narrowed(kernel):
    func = kernel()
    narrowed = _loads_of_x(_lowered_like_tvm(schedule_func(narrow_indices(func), default_rules(NEON64))[0]))
    assert any("if_then_else" not in line for line in narrowed)  # an interior without the border test
    # without narrowing, TVM's NarrowDataType drops the hints: every load keeps its test
    plain = _loads_of_x(_lowered_like_tvm(schedule_func(func, default_rules(NEON64))[0]))
    assert plain and all("if_then_else" in line for line in plain)


def _loads_of_x(script: str) -> list[str]:
    return [line for line in script.splitlines() if re.search(r"(?<!\w)x_1\[", line)]


@pytest.mark.parametrize("kernel", [padded_rgb_kernel, max_pool_kernel_int64], ids=["pad-rgb", "maxpool"])
def test_narrowed_schedule_computes_what_the_naive_one_does(kernel):
    func = kernel()
    assert_computes_the_same(func, schedule_func(narrow_indices(func), default_rules(NEON64))[0])


def _rgb_stem_model(path):
    """A 3x3/2 convolution of an RGB image, padded by one (MobileNet's stem), with ReLU."""
    import numpy as np
    from onnx import helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    initializers = {"w": rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "b": rng.standard_normal(16).astype(np.float32)}
    return make_onnx(nodes, {"x": [1, 3, 64, 64]}, {"y": [1, 16, 32, 32]}, initializers, path)


@needs_objdump
def test_x86_stem_copies_its_padded_input_without_gathers(tmp_path):
    """x86 narrows too: with the model's int64 indices the padded RGB copy's hints were dropped and
    LLVM vectorised the copy as masked ``vgatherqps`` under the border test."""
    import edgec

    _rgb_stem_model(tmp_path / "stem.onnx")
    result = edgec.compile(edgec.load(tmp_path / "stem.onnx"), "x86", tmp_path / "x86")
    assert result.manifest["verification"]["status"] == "passed"
    code = disassembly(tmp_path / "x86" / "lib.so")
    assert "vfmadd" in code  # the convolution was scheduled and vectorised
    assert "gather" not in code
