"""``schedules/depthwise.py``: the depthwise convolution's output tiles along
rows and columns are partitioned (TVM's LoopPartition, from the loops'
``pragma_loop_partition_hint``) into border tiles, which keep the zero-padding
test in their loads, and interior tiles, which load straight; the register
tile is one output row. Checked: the structure after lowering, and the numbers
against the naive kernel (TIR means the same on any CPU: built for this
machine).
"""

from __future__ import annotations

import pytest

from edgec.targets.schedules import default_rules, schedule_func
from edgec.targets.vector import CpuVector
from test_schedules import AVX512, assert_computes_the_same, conv_kernel  # tests/targets is on the path

NEON64 = CpuVector(lanes=4, registers=32, lane_fma=True)


def _lowered_updates(func) -> list[str]:
    """The accumulator updates (one TIR line each) of ``func`` lowered through LoopPartition."""
    import tvm
    from tvm import s_tir, tirx

    passes = [
        s_tir.transform.CanonicalizeLoop(),
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerMatchBuffer(),
        s_tir.transform.StmtSimplify(),
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
        s_tir.transform.LoopPartition(),
        tirx.transform.StmtSimplify(),
    ]
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    for transform in passes:
        mod = transform(mod)
    return [line for line in mod["main"].script().splitlines() if "w_1[" in line and "=" in line]


@pytest.mark.parametrize("vector", [NEON64, AVX512], ids=["neon64", "avx512"])
def test_interior_tiles_load_without_the_border_test(vector):
    func = conv_kernel(kernel=3, channels=64, filters=64, groups=64, size=28)
    scheduled, rule = schedule_func(func, default_rules(vector))
    assert rule == "depthwise-conv2d-nhwc"
    updates = _lowered_updates(scheduled)
    straight = [line for line in updates if "if_then_else" not in line]
    bordered = [line for line in updates if "if_then_else" in line]
    assert len(straight) == 1  # the interior: rows 1.. and columns 1.. short of the last tile
    assert len(bordered) == 8  # the 3x3 grid of partitions less its centre


def test_register_tile_is_one_output_row():
    func = conv_kernel(kernel=3, channels=192, filters=192, groups=192, size=28)  # was 2x4 points
    scheduled, _ = schedule_func(func, default_rules(NEON64))
    loops = _tile_loops(scheduled)
    assert loops["yy_1"] == 1 and loops["xx_1"] > 1


@pytest.mark.parametrize(
    ("kernel", "stride", "channels", "size"),
    [(3, 1, 64, 28), (3, 2, 48, 57), (3, 1, 24, 13), (5, 1, 32, 14), (3, 2, 96, 112)],
)
@pytest.mark.parametrize("vector", [NEON64, AVX512], ids=["neon64", "avx512"])
def test_partitioned_kernel_computes_what_the_naive_one_does(kernel, stride, channels, size, vector):
    func = conv_kernel(kernel=kernel, stride=stride, channels=channels, filters=channels, groups=channels, size=size)
    scheduled, rule = schedule_func(func, default_rules(vector))
    assert rule == "depthwise-conv2d-nhwc"
    assert_computes_the_same(func, scheduled)


def _tile(func, vector) -> tuple[int, int]:
    """(points, channel vectors) of the scheduled depthwise register tile."""
    loops = _tile_loops(schedule_func(func, default_rules(vector))[0])
    return loops["xx_1"], loops.get("ff_1_0", 1)


def test_tile_leaves_the_taps_weights_their_registers():
    """3x3 taps of a 2-vector tile hold 18 weight registers: at most 14 accumulators beside them
    in a 32-register file (7 points, not 8); a 16-register file keeps the plain budget."""
    from edgec.targets.schedules.depthwise import MAX_VECTORS

    func = conv_kernel(kernel=3, channels=144, filters=144, groups=144, size=56)
    points, vectors = _tile(func, NEON64)
    assert vectors == MAX_VECTORS and points * vectors <= NEON64.registers - 9 * vectors
    assert (points, vectors) == (7, 2)
    neon32 = CpuVector(lanes=4, registers=16)
    points, vectors = _tile(func, neon32)
    assert points * vectors <= neon32.accumulators and points * vectors > 16 - 9 * vectors  # no cap there
    assert_computes_the_same(func, schedule_func(func, default_rules(NEON64))[0])


def _silu_depthwise(kernel: int, channels: int, size: int):
    """A depthwise convolution + bias + SiLU, its sigmoid rewritten by fast_math as compile does."""
    import tvm
    from tvm import te, topi

    from edgec.targets.schedules.fast_math import fast_math

    data = te.placeholder((1, size, size, channels), name="x")
    weight = te.placeholder((kernel, kernel, 1, channels), name="w")
    bias = te.placeholder((1, 1, 1, channels), name="b")
    out = topi.add(topi.nn.conv(data, weight, 1, kernel // 2, 1, channels, "NHWC", "HWIO"), bias)
    func = te.create_prim_func([data, weight, bias, topi.multiply(out, topi.sigmoid(out))])
    return fast_math()(tvm.IRModule({"main": func}))["main"]


def _for_loops(scheduled) -> list:
    """The ``For`` nodes of a scheduled PrimFunc, innermost first."""
    import tvm_ffi
    from tvm import tirx

    loops = []
    tvm_ffi.structural_walk(scheduled.body, [(tirx.For, loops.append)], order="post")
    return loops


def _tile_loops(scheduled) -> dict[str, int]:
    """Loop name -> extent."""
    return {loop.loop_var.name: int(loop.extent) for loop in _for_loops(scheduled)}


@pytest.mark.parametrize(("kernel", "channels", "size"), [(3, 32, 28), (5, 672, 14), (3, 144, 14)])
def test_heavy_epilogue_gets_a_one_vector_tile_on_x86(kernel, channels, size):
    """A SiLU epilogue (x86): one channel vector, at most HEAVY_EPILOGUE_ACCUMULATORS pixels; a
    ReLU keeps the wide tile; a CPU with a lane multiply-add keeps its tile."""
    from edgec.targets.schedules.depthwise import HEAVY_EPILOGUE_ACCUMULATORS

    func = _silu_depthwise(kernel, channels, size)
    scheduled, rule = schedule_func(func, default_rules(AVX512))
    assert rule == "depthwise-conv2d-nhwc"
    loops = _tile_loops(scheduled)  # ax3: the tile's channels as its epilogue writes them, xx_1: its pixels
    assert loops["ax3"] == AVX512.lanes and loops["xx_1"] <= HEAVY_EPILOGUE_ACCUMULATORS, loops
    assert_computes_the_same(func, scheduled)
    relu = _tile_loops(schedule_func(conv_kernel(kernel=kernel, channels=channels, filters=channels, groups=channels, size=size),
                                     default_rules(AVX512))[0])  # fmt: skip
    assert relu["ax3"] * relu["xx_1"] > AVX512.lanes * HEAVY_EPILOGUE_ACCUMULATORS, relu
    lane = _tile_loops(schedule_func(func, default_rules(NEON64))[0])
    assert lane["ax3"] * lane["xx_1"] // NEON64.lanes > HEAVY_EPILOGUE_ACCUMULATORS, lane


def _integer_depthwise(channels: int = 144, size: int = 56):
    """uint8 activations x int16 weights (how qdq_integer stores int8 weights on aarch64) into int32."""
    from tvm import te, topi

    data = te.placeholder((1, size, size, channels), "uint8", name="x")
    weight = te.placeholder((3, 3, 1, channels), "int16", name="w")
    out = topi.nn.conv(data, weight, 1, 1, 1, channels, "NHWC", "HWIO", out_dtype="int32")
    return te.create_prim_func([data, weight, out])


def test_integer_kernel_multiplies_eight_int16_lanes_per_register():
    """int16 weights (aarch64): the channel tile is vectorised 8 lanes at a time, one int16
    register, and the interior loop is ``ushll`` + ``smlal``/``smlal2`` with no lane-by-lane
    assembly of byte vectors (``umov``/``mov v.b[i]``, what 4 lanes gave); exact in int32."""
    from tvm import tirx

    from edgec.targets import resolve
    from test_lane_broadcast import inner_loop

    func = _integer_depthwise()
    scheduled, rule = schedule_func(func, default_rules(NEON64))
    assert rule == "depthwise-conv2d-nhwc"
    vectorised = [int(loop.extent) for loop in _for_loops(scheduled) if loop.kind == tirx.ForKind.VECTORIZED]
    assert vectorised and set(vectorised) == {NEON64.lanes_of("int16")}
    body = inner_loop(scheduled, resolve("cortex-a53").tvm_target(), "smlal")
    operations = [line.split()[0] for line in body]
    assert "smlal2" in operations and {"uxtl", "ushll"} & set(operations)  # the assembler's name, objdump's alias
    assert not {"umov", "tbl", "ins"} & set(operations) and not any(line.startswith("mov\tv") or line.startswith("mov v") for line in body)
    multiplies = sum(op.startswith(("smull", "smlal")) for op in operations)
    assert len(body) <= 2.5 * multiplies, body  # 4 lanes: ~8 instructions per multiply-add
    assert_computes_the_same(func, scheduled)  # exact: an int32 output
