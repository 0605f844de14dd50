"""``schedules/pooling.py``: window pools (NHWC max / average pooling) tiled like a
depthwise convolution: output columns by a vector tile of channels, the taps
unrolled, the row and column loops partitioned into border and interior tiles
(the interior loads without the padding test), and max as LLVM's ``maxnum``
(one NEON ``fmaxnm``). Checked: the structure of the schedule and of the
lowered loops, the numbers against the naive kernel (built for this machine:
TIR means the same on any CPU), the aarch64 assembly; and the register tile of
a few-channel stem whose taps are unrolled (``conv2d.UNROLLED_TAPS_ACCUMULATORS``).
"""

from __future__ import annotations

import collections
import dataclasses
import re

import pytest

from edgec.targets import resolve
from edgec.targets.schedules import default_rules, schedule_func
from edgec.targets.schedules.common import register_tile
from edgec.targets.schedules.conv2d import UNROLLED_TAPS_ACCUMULATORS
from edgec.targets.vector import CpuVector, cpu_vector
from test_schedules import AVX512, assert_computes_the_same, conv_kernel, global_mean_kernel  # tests/targets is on the path

NEON64 = CpuVector(lanes=4, registers=32, lane_fma=True, max_number=True)
VECTORS = [NEON64, AVX512]
IDS = ["neon64", "avx512"]


def pool_kernel(kind="max", size=15, channels=24, window=3, stride=2, padding=1, count_include_pad=True):
    from tvm import te, topi

    data = te.placeholder((1, size, size, channels), name="x")
    pads = (padding,) * 4
    out = topi.nn.pool2d(
        data, (window, window), (stride, stride), (1, 1), pads, kind, count_include_pad=count_include_pad, layout="NHWC"
    )
    return te.create_prim_func([data, out])


def _loop_kinds(func) -> dict[str, tuple[str, dict]]:
    import tvm_ffi
    from tvm import tirx

    loops = {}

    def visit(node):
        loops[node.loop_var.name] = (tirx.ForKind(int(node.kind)).name.lower(), dict(node.annotations))

    tvm_ffi.structural_walk(func.body, [(tirx.For, visit)], order="post")
    return loops


def _calls(func) -> collections.Counter:
    import tvm
    import tvm_ffi
    from tvm import tirx

    found: collections.Counter = collections.Counter()

    def note(node):
        found[getattr(node.op, "name", "")] += 1
        return node

    def note_max(node):
        found[f"max:{node.ty}"] += 1
        return node

    tvm_ffi.structural_map(func.body, (tvm.ir.Call, note), order="post")
    tvm_ffi.structural_map(func.body, (tirx.Max, note_max), order="post")
    return found


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_window_pool_is_tiled_partitioned_and_unrolled(vector):
    scheduled, rule = schedule_func(pool_kernel(size=112, channels=24), default_rules(vector))
    assert rule == "pool-reduce"
    loops = _loop_kinds(scheduled)
    partitioned = [name for name, (_, notes) in loops.items() if "pragma_loop_partition_hint" in notes]
    assert len(partitioned) == 2  # the rows (parallel) and the column tiles
    assert any(kind == "parallel" for name, (kind, _) in loops.items() if name in partitioned)
    assert loops["rv0"][0] == "unrolled" and loops["rv1"][0] == "unrolled"  # the window's taps
    assert any(kind == "vectorized" for kind, _ in loops.values())
    calls = _calls(scheduled)
    if vector.max_number:  # aarch64: max as maxnum (fmaxnm)
        assert calls["tirx.call_llvm_pure_intrin"] >= 1 and calls["max:float32"] == 0
    else:  # x86: TVM's max (vmaxps)
        assert calls["tirx.call_llvm_pure_intrin"] == 0 and calls["max:float32"] >= 1


def test_global_mean_keeps_the_reduction_loop_nest():
    scheduled, rule = schedule_func(global_mean_kernel(), default_rules(NEON64))
    assert rule == "pool-reduce"
    assert not any("pragma_loop_partition_hint" in notes for _, notes in _loop_kinds(scheduled).values())


def _interior_loads(func) -> tuple[int, int]:
    """(loads of ``x`` without a border test, loads with one) in ``func`` lowered through LoopPartition."""
    import tvm
    from tvm import s_tir, tirx

    passes = [
        s_tir.transform.CanonicalizeLoop(), s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(), s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(), s_tir.transform.LowerMatchBuffer(), s_tir.transform.StmtSimplify(),
        s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(), s_tir.transform.LoopPartition(),
        tirx.transform.StmtSimplify(),
    ]  # fmt: skip
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    for transform in passes:
        mod = transform(mod)
    updates = [line for line in mod["main"].script().splitlines() if "x_1[" in line and ("maxnum" in line or "T.max(" in line)]
    return sum("if_then_else" not in line for line in updates), sum("if_then_else" in line for line in updates)


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_interior_tiles_load_without_the_border_test(vector):
    scheduled, _ = schedule_func(pool_kernel(size=56, channels=64), default_rules(vector))
    straight, bordered = _interior_loads(scheduled)
    assert straight >= 1 and bordered >= 1


@pytest.mark.parametrize(
    "kernel",
    [
        dict(size=15, channels=24),  # odd size: the last window hangs over the border
        dict(size=16, channels=64),
        dict(size=14, channels=3, window=2, stride=2, padding=0),  # fewer channels than lanes
        dict(size=13, channels=40, window=3, stride=1, padding=1),
        dict(kind="avg", size=15, channels=24),
        dict(kind="avg", size=14, channels=32, count_include_pad=False),
    ],
    ids=["max3s2-odd", "max3s2-even", "max2s2-rgb", "max3s1", "avg3s2", "avg3s2-exclude-pad"],
)
@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_window_pool_computes_what_the_naive_one_does(kernel, vector):
    func = pool_kernel(**kernel)
    scheduled, rule = schedule_func(func, default_rules(vector))
    assert rule == "pool-reduce"
    assert_computes_the_same(func, scheduled)


def test_only_aarch64_has_a_vector_maximum_of_numbers():
    assert cpu_vector(resolve("cortex-a53")).max_number and cpu_vector(resolve("cortex-a72")).max_number
    assert not cpu_vector(resolve("cortex-a7")).max_number and not cpu_vector(resolve("x86")).max_number


def test_aarch64_max_pool_takes_the_maximum_in_one_instruction():
    import tvm

    preset = resolve("cortex-a53")
    scheduled, _ = schedule_func(pool_kernel(size=56, channels=24), default_rules(cpu_vector(preset)))
    library = tvm.tirx.build(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=preset.tvm_target())
    lines = library.inspect_source("asm").splitlines()
    ops = collections.Counter(line.split()[0] for line in lines if re.match(r"^\s+[a-z]", line))
    assert ops["fmaxnm"] >= 9 * 4  # a 4-column tile's 9 taps, at least
    assert ops["fcmgt"] == 0 and ops["bsl"] == 0  # not compare-and-select


def test_unrolled_stem_tile_leaves_half_the_registers_to_the_taps():
    """A few-channel stem on aarch64 (taps unrolled) tiles at most UNROLLED_TAPS_ACCUMULATORS
    accumulators; without the lane multiply-add (armv7, x86) the taps are not unrolled and the
    broadcast tile's own cap holds (conv2d.BROADCAST_TILE_ACCUMULATORS)."""
    from edgec.targets.schedules.conv2d import BROADCAST_TILE_ACCUMULATORS, Conv2DNHWC

    assert register_tile([112, 112], 24, NEON64) == ([1, 8], 12)  # 24 accumulators without the cap
    func = conv_kernel(kernel=3, stride=2, channels=3, filters=24, size=32)
    accumulators = {}
    for vector in (NEON64, dataclasses.replace(NEON64, lane_fma=False)):
        sch = Conv2DNHWC(vector).apply(func)
        accumulators[vector.lane_fma] = _extent(sch, "yy_1") * _extent(sch, "xx_1") * _extent(sch, "ff_1_0")
    # 8 points x 2 vectors (the staged input rows are read by lane: conv2d.stage_input_rows)
    assert accumulators[True] == 16
    assert accumulators[False] <= BROADCAST_TILE_ACCUMULATORS  # 8 x 3 = 24 before that cap
    assert 12 <= UNROLLED_TAPS_ACCUMULATORS < 24
    assert_computes_the_same(func, schedule_func(func, default_rules(NEON64))[0])


def _extent(sch, name: str) -> int:
    import tvm_ffi
    from tvm import tirx

    found = []

    def visit(node):
        if node.loop_var.name == name:
            found.append(int(node.extent))

    tvm_ffi.structural_walk(sch.mod["main"].body, [(tirx.For, visit)], order="post")
    return found[0] if found else 1
