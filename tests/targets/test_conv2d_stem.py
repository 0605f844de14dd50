"""``conv2d.stage_input_rows``: a few-channel stem (an RGB input) on aarch64 copies the
pixels a register tile reads for one kernel row, one vectorised run of columns x channels,
and its unrolled taps read them by lane. Checked: the schedule's structure (the copy inside
the kernel-row loop, vectorised; none on CPUs without a lane multiply-add), the numbers
(the schedule built for this x86 machine against the naive kernel) and the aarch64
assembly of the inner loop (lane FMAs, vector loads of the input, nothing spilled).
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from edgec.targets import resolve
from edgec.targets.schedules import default_rules, schedule_func
from edgec.targets.schedules.conv2d import Conv2DNHWC
from edgec.targets.vector import cpu_vector
from test_lane_broadcast import NEON64, inner_loop  # tests/targets is on the path (pytest prepends it)
from test_schedules import assert_computes_the_same, conv_kernel

STEMS = {  # (kernel, stride, filters): ResNet-18's 7x7/2, MobileNetV2's 3x3/2 (32), ShuffleNetV2's (24)
    "7x7s2": (7, 2, 64),
    "3x3s2": (3, 2, 32),
    "3x3s2-24": (3, 2, 24),
}


def _stem(name: str, size: int = 32):
    kernel, stride, filters = STEMS[name]
    return conv_kernel(kernel=kernel, stride=stride, channels=3, filters=filters, size=size)


def _staged_copies(sch) -> list:
    """The staging copies: blocks reading the padded input into a ``_global`` buffer."""
    return [block for block in _blocks(sch) if sch.get(block).name_hint == "pad_temp_global"]


def _blocks(sch) -> list:
    import tvm_ffi
    from tvm import s_tir

    names: list[str] = []
    tvm_ffi.structural_walk(sch.mod["main"].body, [(s_tir.SBlock, lambda b: names.append(b.name_hint))], order="post")
    return [sch.get_sblock(name) for name in names if name != "root"]


@pytest.mark.parametrize("name", list(STEMS))
def test_stem_stages_a_kernel_rows_input_where_lanes_are_read(name):
    from tvm import tirx

    sch = Conv2DNHWC(NEON64).apply(_stem(name))
    (copy,) = _staged_copies(sch)
    loops = sch.get_loops(copy)
    kinds = [tirx.ForKind(int(sch.get(loop).kind)).name.lower() for loop in loops]
    update = sch.get_loops(sch.get_sblock("conv2d_nhwc_update"))
    # inside the kernel-row loop (the update's first loop after the parallel tiles), columns x channels one vector
    assert sch.get(loops[1]).same_as(sch.get(update[1])) and kinds[-1] == "vectorized"
    kernel, stride, _ = STEMS[name]
    columns = int(sch.get(sch.get_loops(sch.get_sblock("conv2d_nhwc_update"))[-3]).extent)
    assert int(sch.get(loops[-1]).extent) == 3 * (stride * (columns - 1) + kernel)
    assert not _staged_copies(Conv2DNHWC(dataclasses.replace(NEON64, lane_fma=False)).apply(_stem(name)))
    assert_computes_the_same(_stem(name), sch.mod["main"])  # TIR means the same on any CPU: checked here


def test_x86_stem_keeps_its_loads():
    scheduled, rule = schedule_func(_stem("7x7s2"), default_rules(cpu_vector(resolve("x86"))))
    assert rule == "conv2d-nhwc" and "pad_temp_global" not in scheduled.script()


@pytest.mark.parametrize("name", list(STEMS))
def test_aarch64_stem_reads_its_input_by_lane(name):
    target = resolve("cortex-a53").tvm_target()
    scheduled, rule = schedule_func(_stem(name, size=224), default_rules(cpu_vector(resolve("cortex-a53"))))
    loop = inner_loop(scheduled, target)
    fmla = [op for op in loop if op.startswith("fmla")]
    assert rule == "conv2d-nhwc" and fmla
    by_lane = [op for op in fmla if re.search(r"\.s\[[0-3]\]$", op)]
    assert len(by_lane) == len(fmla)
    # the input as vectors: no broadcast load or scalar load per tap, pixel and channel
    scalar_loads = [op for op in loop if op.startswith(("ld1r", "ldr\ts", "ldp\ts"))]
    assert len(scalar_loads) <= 2
    assert not any(op.startswith(("str", "stp")) for op in loop)  # nothing spilled
    assert len(loop) / len(fmla) < 1.2  # 1.31-1.40 when each tap loaded its scalars
