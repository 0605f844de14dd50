"""``fold_adds``: on aarch64 a convolution's accumulators start at the bias (and the residual
shortcut) added after it, and the epilogue loses those additions. Checked: the structure (the
init stores the bias, no block adds it afterwards), the numbers (the schedule built for this
x86 machine against the naive kernel), the aarch64 assembly (no ``fadd`` left), what is left
alone (a computed addend, CPUs without the lane multiply-add), and the wide tile of a
matrix-vector product (dense.py)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from edgec.targets import resolve
from edgec.targets.schedules import default_rules, schedule_func
from edgec.targets.schedules.common import register_tile
from edgec.targets.vector import CpuVector
from test_schedules import _prim_func, assert_computes_the_same, conv_kernel, dense_kernel  # tests/targets is on the path

NEON64 = CpuVector(lanes=4, registers=32, lane_fma=True)


def residual_kernel(kernel=1, channels=32, filters=32, size=14, computed_addend=False):
    """conv + bias + shortcut (+ relu): a ResNet / MobileNetV2 projection's kernel; with
    ``computed_addend`` the shortcut is ``exp(r)``, computed in the kernel."""
    from tvm import te, topi

    data = te.placeholder((1, size, size, channels), name="x")
    weight = te.placeholder((kernel, kernel, channels, filters), name="w")
    bias = te.placeholder((1, 1, 1, filters), name="b")
    shortcut = te.placeholder((1, size, size, filters), name="r")
    out = topi.add(topi.nn.conv(data, weight, 1, kernel // 2, 1, 1, "NHWC", "HWIO"), bias)
    out = topi.add(out, topi.exp(shortcut) if computed_addend else shortcut)
    return _prim_func([data, weight, bias, shortcut, topi.nn.relu(out)])


def _blocks(func) -> dict[str, object]:
    import tvm_ffi
    from tvm import s_tir

    found: list = []
    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, lambda block: found.append(block))], order="post")
    return {block.name_hint: block for block in found}


def _init_block(func):
    return next(block for name, block in _blocks(func).items() if name.endswith("_init"))


def _reads(block) -> set[str]:
    """The buffers the block's body loads (an init block's ``reads`` are left empty by TVM)."""
    import tvm_ffi
    from tvm import ir

    found: list = []
    tvm_ffi.structural_walk(block.body, [(ir.TensorLoad, lambda load: found.append(load.source.name))], order="post")
    return set(found)


KERNELS = {
    "conv1x1": lambda: conv_kernel(kernel=1, channels=32, filters=64, size=14),
    "conv3x3s2": lambda: conv_kernel(kernel=3, stride=2, channels=16, filters=24, size=15),
    "stem": lambda: conv_kernel(kernel=3, stride=2, channels=3, filters=32, size=32),
    "depthwise": lambda: conv_kernel(kernel=3, channels=32, filters=32, size=14, groups=32),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_bias_starts_the_accumulators(name):
    func = KERNELS[name]()
    scheduled, rule = schedule_func(func, default_rules(NEON64))
    assert rule in ("conv2d-nhwc", "depthwise-conv2d-nhwc")
    assert _reads(_init_block(scheduled)) == {"b"}
    readers = [block_name for block_name, block in _blocks(scheduled).items() if block_name != "root" and "b" in _reads(block)]
    assert all(block_name.startswith(("conv2d_nhwc", "group_conv2d_nhwc")) for block_name in readers), readers
    assert_computes_the_same(func, scheduled)


def test_residual_chain_folds_bias_and_shortcut():
    func = residual_kernel()
    scheduled, rule = schedule_func(func, default_rules(NEON64))
    assert rule == "conv2d-nhwc"
    assert _reads(_init_block(scheduled)) == {"b", "r"}
    assert_computes_the_same(func, scheduled)


def test_computed_addend_and_other_cpus_are_left_alone():
    func = residual_kernel(computed_addend=True)
    scheduled, _ = schedule_func(func, default_rules(NEON64))
    assert _reads(_init_block(scheduled)) == {"b"}  # the bias folds, exp(r) stays in the epilogue
    assert_computes_the_same(func, scheduled)
    plain, _ = schedule_func(conv_kernel(kernel=1), default_rules(dataclasses.replace(NEON64, lane_fma=False)))
    assert _reads(_init_block(plain)) == set()  # x86, armv7: accumulators start at zero


def _float_ops(func) -> list[str]:
    import tvm

    target = resolve("cortex-a53").tvm_target()
    library = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    return [line.split()[0] for line in library.inspect_source("asm").splitlines() if re.match(r"^\s+f[a-z]+\s", line)]


def test_aarch64_epilogue_loses_its_adds():
    """A bias alone: no ``fadd`` left; bias + shortcut: one per accumulator (the init's
    ``b + r``) where the unfolded kernel adds twice."""
    from edgec.targets.schedules.conv2d import Conv2DNHWC

    class Unfolded(Conv2DNHWC):  # the same rule, tile and broadcasts, with the folding alone off
        fold_adds = False

    plain = [Unfolded(rule.vector) if type(rule) is Conv2DNHWC else rule for rule in default_rules(NEON64)]
    bias_only = _float_ops(schedule_func(conv_kernel(kernel=1, channels=64, filters=96), default_rules(NEON64))[0])
    assert bias_only.count("fmla") > 0 and bias_only.count("fadd") == 0
    residual = residual_kernel(channels=64, filters=96)
    folded = _float_ops(schedule_func(residual, default_rules(NEON64))[0]).count("fadd")
    unfolded = _float_ops(schedule_func(residual, plain)[0]).count("fadd")
    assert 0 < folded and 2 * folded <= unfolded


def test_matrix_vector_tile_is_wide_on_aarch64():
    assert register_tile([1], 1000, NEON64, max_vectors=16, lane_operand=True) == ([1], 40)
    func = dense_kernel(rows=1, depth=64, columns=200)
    scheduled, rule = schedule_func(func, default_rules(NEON64))
    assert rule == "dense"
    init = _init_block(scheduled)
    assert int(init.iter_vars[-1].dom.extent) == 200
    assert_computes_the_same(func, scheduled)
