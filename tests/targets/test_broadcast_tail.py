"""``common.broadcast_tail``: a kernel whose epilogue broadcasts the contraction's result over a
bigger output (a squeeze-and-excitation scale, ``x * sigmoid(fc(s) + b)``) computes the small
result once and the broadcast on its own, in parallel. Checked: the structure (the sigmoid is
computed once per channel, the multiply runs in a parallel loop of its own over the output's
pixels), the numbers (the schedule built for this machine against the naive kernel) and that a
kernel without such a tail keeps its one fused epilogue."""

from __future__ import annotations

import pytest

from edgec.targets.schedules import default_rules, first_schedule
from test_fold_adds import _blocks as _func_blocks  # tests/targets is on the path
from test_schedules import AVX512, NEON32, _prim_func, assert_rule_computes_the_same, conv_kernel


def scale_kernel(squeeze=6, channels=144, size=56, activation="sigmoid"):
    """EfficientNet-B0's squeeze-and-excitation scale as one fused kernel: the second fc (a 1x1
    conv of the squeezed pixel), its bias and sigmoid, times the block's feature map."""
    from tvm import te, topi

    s = te.placeholder((1, 1, 1, squeeze), name="s")
    w = te.placeholder((1, 1, squeeze, channels), name="w")
    b = te.placeholder((1, 1, 1, channels), name="b")
    x = te.placeholder((1, size, size, channels), name="x")
    gate = topi.add(topi.nn.conv(s, w, 1, 0, 1, 1, "NHWC", "HWIO"), b)
    gate = topi.sigmoid(gate) if activation == "sigmoid" else topi.clip(topi.add(gate, 3.0), 0.0, 6.0)
    return _prim_func([s, w, b, x, topi.multiply(x, gate)])


def _blocks(sch) -> dict[str, object]:
    """Every block of the schedule by name (root blocks and those in loops alike), but the root."""
    return {name: block for name, block in _func_blocks(sch.mod["main"]).items() if name != "root"}


def _elements(region) -> int:
    count = 1
    for dim in region.source.shape:
        count *= int(dim)
    return count


def _calls(block) -> set[str]:
    import tvm_ffi
    from tvm import ir

    found: list = []
    tvm_ffi.structural_walk(block.body, [(ir.Call, lambda call: found.append(str(call.op.name)))], order="post")
    return set(found)


@pytest.mark.parametrize("vector", [AVX512, NEON32], ids=["avx512", "neon32"])
def test_scale_is_computed_once_and_broadcast_in_parallel(vector):
    from tvm import tirx

    sch, rule = first_schedule(scale_kernel(), default_rules(vector))
    assert rule == "conv2d-nhwc"
    blocks = _blocks(sch)
    gates = [block for block in blocks.values() if "tirx.sigmoid" in _calls(block)]
    assert len(gates) == 1 and _elements(gates[0].writes[0]) == 144  # once per channel, not per pixel
    multiply = sch.get_sblock("T_multiply")
    assert "tirx.sigmoid" not in _calls(sch.get(multiply))
    outer = sch.get(sch.get_loops(multiply)[0])
    assert tirx.ForKind(int(outer.kind)).name == "PARALLEL" and int(outer.extent) == 56 * 56
    anchor = sch.get_loops(sch.get_sblock("conv2d_nhwc_update"))[0]
    assert "T_multiply" not in {block.name_hint for block in _blocks_under(sch, anchor)}


def _blocks_under(sch, loop) -> list:
    import tvm_ffi
    from tvm import s_tir

    found: list = []
    tvm_ffi.structural_walk(sch.get(loop).body, [(s_tir.SBlock, found.append)], order="post")
    return found


@pytest.mark.parametrize(
    "make",
    [
        lambda: scale_kernel(),
        lambda: scale_kernel(squeeze=8, channels=32, size=112),
        lambda: scale_kernel(squeeze=4, channels=24, size=14, activation="hardsigmoid"),
    ],
    ids=["effnet-56x56x144", "effnet-112x112x32", "hard-14x14x24"],
)
def test_scale_kernel_computes_what_the_naive_one_does(make):
    assert_rule_computes_the_same(make(), "conv2d-nhwc")


def test_kernel_without_a_broadcast_keeps_one_epilogue():
    sch, rule = first_schedule(conv_kernel(kernel=1, channels=32, filters=64, size=14), default_rules(AVX512))
    assert rule == "conv2d-nhwc"
    anchor_outer = sch.get_loops(sch.get_sblock("conv2d_nhwc_update"))[0]
    allocated = list(sch.get(sch.get_sblock("root")).alloc_buffers)
    writers = [
        block for block in _blocks(sch).values() if not any(block.writes[0].source.same_as(b) for b in allocated)
    ]  # fmt: skip
    assert len(writers) == 1  # one fused epilogue writes the output, inside the tile's loop, as before
    assert writers[0].name_hint in {block.name_hint for block in _blocks_under(sch, anchor_outer)}
