"""``common.lane_broadcast``: on a CPU with a lane multiply-add (aarch64) the
contractions load their broadcast operand a vector of reduction steps at a
time and read it lane by lane. Checked: the structure of the schedule (the
operand's copy, vectorised), the numbers (the schedule built for this x86
machine against the naive kernel: TIR means the same on any CPU), and the
aarch64 assembly of the inner loop (lane FMAs, no per-value broadcast loads,
fewer instructions per FMA than without).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from edgec.targets import resolve
from edgec.targets.schedules import default_rules, schedule_func
from edgec.targets.schedules.common import register_tile, wants_lane_broadcast
from edgec.targets.vector import CpuVector, cpu_vector
from test_schedules import assert_computes_the_same, conv_kernel, dense_kernel  # tests/targets is on the path (pytest prepends it)

NEON64 = CpuVector(lanes=4, registers=32, lane_fma=True)


def winograd_gemm_kernel(elements=16, tiles=16, channels=64, filters=32):
    from tvm import te

    from edgec.targets.schedules.winograd_kernels import gemm

    data = te.placeholder((elements, tiles, channels), name="V")
    weight = te.placeholder((elements, channels, filters), name="U")
    return te.create_prim_func([data, weight, gemm(data, weight)])


KERNELS = {
    "conv1x1": lambda: conv_kernel(kernel=1, channels=32, filters=64, size=14),
    "conv3x3s2": lambda: conv_kernel(kernel=3, stride=2, channels=16, filters=24, size=15),
    "dense": lambda: dense_kernel(rows=3, depth=40, columns=1000),
    "gemm": winograd_gemm_kernel,
}


def _copies(func) -> list[str]:
    """Names of the blocks that copy an operand into a small buffer (``cache_read``)."""
    import tvm_ffi
    from tvm import s_tir

    names: list[str] = []
    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, lambda block: names.append(block.name_hint))], order="post")
    return [name for name in names if name.endswith("_global") and not name.startswith(("conv2d", "T_", "winograd_gemm", "compute"))]


def test_only_aarch64_has_the_lane_multiply_add():
    assert cpu_vector(resolve("cortex-a53")).lane_fma and cpu_vector(resolve("cortex-a72")).lane_fma
    assert not cpu_vector(resolve("cortex-a7")).lane_fma
    assert not cpu_vector(resolve("x86")).lane_fma
    assert wants_lane_broadcast(NEON64, 64) and not wants_lane_broadcast(NEON64, 3)
    assert not wants_lane_broadcast(NEON64, 4)  # one vector: nothing to share


def test_register_tile_with_lane_operands_counts_their_registers():
    for rows, channels in [([196], 64), ([16], 512), ([28, 28], 128), ([7, 7], 1280), ([13, 13], 1000)]:
        factors, tile = register_tile(rows, channels, NEON64, lane_operand=True)
        points, vectors = int(np.prod(factors)), tile // NEON64.lanes
        assert all(extent % factor == 0 for extent, factor in zip(rows, factors, strict=True))
        assert points * vectors + points + vectors <= NEON64.registers  # accumulators + operand rows + weights
    # the operand costs a quarter load per row: taller tiles than with broadcasts
    assert register_tile([16], 512, NEON64, lane_operand=True) == ([8], 8)
    assert register_tile([16], 512, NEON64) == ([4], 16)


@pytest.mark.parametrize("name", list(KERNELS))
def test_lane_schedule_copies_the_operand_and_computes_what_the_naive_one_does(name):
    func = KERNELS[name]()
    scheduled, rule = schedule_func(func, default_rules(NEON64))
    plain, plain_rule = schedule_func(func, default_rules(dataclasses.replace(NEON64, lane_fma=False)))
    assert rule == plain_rule and rule in ("conv2d-nhwc", "dense")
    assert len(_copies(scheduled)) == 1 and not _copies(plain)
    assert_computes_the_same(func, scheduled)  # TIR means the same on any CPU: checked here


def _inner_loop(func, target) -> list[str]:
    """The instructions of the smallest loop holding ``fmla`` in the aarch64 assembly of ``func``."""
    import tvm

    library = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    labels: dict[str, int] = {}
    instructions: list[str] = []
    for line in library.inspect_source("asm").splitlines():
        text = line.split("//")[0].strip()
        label = re.match(r"^([.\w$]+):$", text)
        if label:
            labels[label.group(1)] = len(instructions)
        elif text and not text.startswith("."):
            instructions.append(text)
    loops = []
    for end, text in enumerate(instructions):
        branch = re.match(r"^(?:b\.\w+|b|cbnz|cbz)\s+(?:\w+,\s*)?([.\w$]+)$", text)
        if branch and labels.get(branch.group(1), end + 1) <= end:
            body = instructions[labels[branch.group(1)] : end + 1]
            if any(op.startswith("fmla") for op in body):
                loops.append(body)
    return min(loops, key=len)


@pytest.mark.parametrize("name", ["conv1x1", "gemm"])
def test_aarch64_inner_loop_multiplies_by_lanes(name):
    target = resolve("cortex-a53").tvm_target()
    func = KERNELS[name]()
    lanes, _ = schedule_func(func, default_rules(cpu_vector(resolve("cortex-a53"))))
    plain, _ = schedule_func(func, default_rules(dataclasses.replace(NEON64, lane_fma=False)))
    loop, plain_loop = _inner_loop(lanes, target), _inner_loop(plain, target)
    fmla = [op for op in loop if op.startswith("fmla")]
    assert all(re.search(r"\.s\[[0-3]\]$", op) for op in fmla)  # every FMA reads a lane
    assert len({re.search(r"\.s\[([0-3])\]$", op).group(1) for op in fmla}) == 4  # of whole vectors
    assert not any(op.startswith(("ld1r", "ldr\ts", "ldp\ts")) for op in loop)  # no per-value loads
    assert not any(op.startswith(("str", "stp")) for op in loop)  # nothing spilled
    per_fma = len(loop) / len(fmla)
    plain_per_fma = len(plain_loop) / sum(op.startswith("fmla") for op in plain_loop)
    assert per_fma < plain_per_fma and per_fma < 1.35


def test_few_channel_stem_unrolls_its_taps_where_lanes_are_read():
    """An RGB stem (3 input channels: no whole vector to load) unrolls a kernel row's taps on
    aarch64, and keeps the loop on x86 (conv2d.Conv2DNHWC's ``unroll_taps``)."""
    from tvm import tirx

    from edgec.targets.schedules.conv2d import Conv2DNHWC

    def tap_loops(vector):
        sch = Conv2DNHWC(vector).apply(conv_kernel(kernel=7, stride=2, channels=3, filters=64, size=32, relu=False))
        loops = sch.get_loops(sch.get_sblock("conv2d_nhwc_update"))
        kinds = [tirx.ForKind(int(sch.get(loop).kind)).name.lower() for loop in loops]
        return kinds[-6:-4]  # rx, rc before the register tile (y, x, f registers, f lanes)

    assert tap_loops(NEON64) == ["unrolled", "unrolled"]
    assert tap_loops(dataclasses.replace(NEON64, lane_fma=False)) == ["serial", "serial"]
