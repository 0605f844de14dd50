"""Ragged register tiles (``common.register_tile(ragged=True)``): on an axis of prime extent
(SqueezeNet's 13x13 maps) the only dividing tiles are 13 pixels x 1 vector or 1 pixel, fewer
multiply-adds than loads per step; a tile of 7 pixels x 3 vectors does not divide 13, and its
last, partial tile runs apart (``tile_nest``'s ``partitioned`` loop). Checked: which tiles are
chosen, the loop nest (the column tiles' loop serial, carrying the partition hint, outside the
parallel loop), and the numbers against the naive kernel for 1x1 and padded 3x3 convolutions."""

from __future__ import annotations

import pytest

from edgec.targets import resolve
from edgec.targets.schedules import default_rules, first_schedule
from edgec.targets.schedules.common import register_tile
from test_schedules import AVX512, NEON32, assert_rule_computes_the_same, conv_kernel  # tests/targets is on the path


def test_prime_extent_takes_a_ragged_tile_only_where_dividing_ones_are_load_bound():
    assert register_tile([13, 13], 1008, AVX512) == ([1, 13], 16)  # 13 FMAs per 14 loads
    assert register_tile([13, 13], 1008, AVX512, ragged=True) == ([1, 7], 48)  # 21 per 10, 13 of 14 points used
    assert register_tile([13, 13], 64, NEON32, ragged=True)[0][1] not in (1, 13)
    for rows, channels in (([14, 14], 96), ([7, 7], 512), ([56, 56], 24), ([28, 28], 32)):
        # a dividing tile with at least one multiply-add per load: unchanged
        assert register_tile(rows, channels, AVX512, ragged=True) == register_tile(rows, channels, AVX512)


def _annotated(sch, loop) -> bool:
    return "pragma_loop_partition_hint" in sch.get(loop).annotations


def test_ragged_conv_runs_its_column_tiles_apart_and_partitioned():
    from tvm import tirx

    sch, rule = first_schedule(conv_kernel(kernel=1, channels=64, filters=96, size=13), default_rules(AVX512))
    assert rule == "conv2d-nhwc"
    loops = sch.get_loops(sch.get_sblock("conv2d_nhwc_update"))
    kinds = [tirx.ForKind(int(sch.get(loop).kind)).name for loop in loops]
    assert kinds[0] == "PARALLEL" and int(sch.get(loops[0]).extent) == 13 * 2  # rows x channel tiles of 48
    columns = loops[1]
    assert kinds[1] == "SERIAL" and _annotated(sch, columns) and int(sch.get(columns).extent) == 2  # 7 + 6 of 13
    assert [int(sch.get(loop).extent) for loop in loops[-4:]] == [1, 7, 3, 16]  # the tile: 1 x 7 pixels x 3 vectors
    epilogue_loops = sch.get_loops(sch.get_sblock("compute"))
    assert sch.get(epilogue_loops[1]).same_as(sch.get(columns))  # written out one tile at a time


def test_dividing_tiles_keep_one_parallel_nest():
    sch, _ = first_schedule(conv_kernel(kernel=1, channels=64, filters=96, size=14), default_rules(AVX512))
    loops = sch.get_loops(sch.get_sblock("conv2d_nhwc_update"))
    assert not any(_annotated(sch, loop) for loop in loops)


@pytest.mark.parametrize(
    "make",
    [
        lambda: conv_kernel(kernel=1, channels=64, filters=96, size=13),
        lambda: conv_kernel(kernel=1, channels=32, filters=1008, size=13, relu=False),
        lambda: conv_kernel(kernel=3, channels=16, filters=48, size=13),
        lambda: conv_kernel(kernel=3, stride=2, channels=16, filters=48, size=27),
        lambda: conv_kernel(kernel=1, channels=16, filters=48, size=11),
    ],
    ids=["1x1-13", "1x1-13-classifier", "3x3-13-padded", "3x3s2-27-to-14", "1x1-11"],
)
def test_ragged_conv_computes_what_the_naive_one_does(make):
    assert_rule_computes_the_same(make(), "conv2d-nhwc")


def test_partitioned_tiles_run_without_a_bounds_test():
    """LoopPartition splits the column tiles of 7 + 6 of 13: in the LLVM IR the full tile's
    reduction step is 21 vector multiply-adds (7 pixels x 3 vectors) and the partial tile's 18,
    each block with one compare, its loop's own, and no per-pixel test."""
    import re

    import tvm

    sch, _ = first_schedule(conv_kernel(kernel=1, channels=64, filters=96, size=13, relu=False), default_rules(AVX512))
    module = tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")})
    library = tvm.tirx.build(module, target=resolve("x86").tvm_target())
    source = next(m.inspect_source("ll") for m in [library, *library.imports] if m.kind == "llvm")
    bodies = [block for block in re.split(r"\n(?=[\w.]+:)", source) if "llvm.fmuladd.v16f32" in block]
    steps = sorted(block.count("llvm.fmuladd.v16f32") for block in bodies if block.count("llvm.fmuladd.v16f32") > 1)
    assert steps == [18, 21]
    assert all(block.count("icmp") == 1 for block in bodies if block.count("llvm.fmuladd.v16f32") > 1)
