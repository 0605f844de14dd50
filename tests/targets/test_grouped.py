"""``schedules/grouped.py``: grouped convolutions (``1 < groups < channels``, RegNet,
ResNeXt) get conv2d's register tile per group, vectorised over a group's output
channels. Checked: which rule takes which convolution, the tile's structure (the
vectorised loop divides the group width and fits a register), the TIR's numbers
against the naive kernel for every vector shape (TIR means the same on any CPU:
built for this machine), and a small grouped CNN compiled for x86, cortex-a53 and
cortex-a7, verified against ONNX Runtime (on the emulated boards for ARM).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from backbone import assert_board_verified  # tests/ is on the path
from torch import nn

import edgec
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import run_onnxruntime
from edgec.targets.schedules import default_rules, schedule_func
from edgec.targets.schedules.common import MIN_PARALLEL_WORK
from edgec.targets.vector import CpuVector
from test_schedules import AVX512, NEON32, assert_computes_the_same, conv_kernel  # tests/targets is on the path

AVX2 = CpuVector(lanes=8, registers=16)
NEON64 = CpuVector(lanes=4, registers=32, lane_fma=True)
VECTORS = [AVX512, AVX2, NEON64, NEON32]
VECTOR_IDS = ["avx512", "avx2", "neon64", "neon32"]
RULE = "grouped-conv2d-nhwc"

# (kernel, stride, input channels, output channels, groups, size): group widths (in/out)
# 8/8 (RegNetY), 16/16 (RegNetX), 24/24 and 12 out of 6 in (neither a multiple of the
# vector), 4/4 (ResNeXt-like, narrower than NEON's vector is wide), a 1x1 grouped conv
CASES = [
    (3, 1, 48, 48, 6, 14),
    (3, 2, 64, 64, 4, 15),
    (3, 1, 48, 48, 2, 13),
    (3, 2, 24, 48, 4, 9),
    (3, 1, 32, 32, 8, 10),
    (1, 1, 64, 64, 4, 7),
]


def _loops(func) -> dict[str, tuple[int, object]]:
    """Every loop of ``func``: name -> (extent, tirx.ForKind)."""
    import tvm_ffi
    from tvm import tirx

    loops = {}

    def visit(node):
        loops[node.loop_var.name] = (int(node.extent), node.kind)

    tvm_ffi.structural_walk(func.body, [(tirx.For, visit)], order="post")
    return loops


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
@pytest.mark.parametrize(("kernel", "stride", "channels", "filters", "groups", "size"), CASES)
def test_grouped_conv_is_scheduled_per_group_and_computes_what_the_naive_one_does(
    kernel, stride, channels, filters, groups, size, vector
):
    func = conv_kernel(kernel=kernel, stride=stride, channels=channels, filters=filters, groups=groups, size=size)
    scheduled, rule = schedule_func(func, default_rules(vector))
    assert rule == RULE
    from tvm.tirx import ForKind

    width, loops = filters // groups, _loops(scheduled)
    vectorised = [extent for name, (extent, kind) in loops.items() if name.startswith("ff") and kind == ForKind.VECTORIZED]
    assert len(vectorised) == 2  # the accumulator's init and update, over a group's output channels
    assert all(extent <= vector.lanes and width % extent == 0 for extent in vectorised)
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    work = out * out * filters * kernel * kernel * (channels // groups)
    tile_loops = [kind for name, (_, kind) in loops.items() if name.startswith("nn_") and name.endswith("_fused")]
    assert tile_loops == [ForKind.PARALLEL if work >= MIN_PARALLEL_WORK else ForKind.SERIAL]
    assert_computes_the_same(func, scheduled)


def test_aarch64_loads_a_groups_input_channels_a_vector_at_a_time():
    """With a lane multiply-add, a group of 8 input channels is read as two 4-lane vectors
    per pixel (``lane_broadcast``'s cached copy), not one broadcast per channel."""
    func = conv_kernel(kernel=3, channels=104, filters=104, groups=13, size=28)
    with_lanes, rule = schedule_func(func, default_rules(NEON64))
    assert rule == RULE
    assert "pad_temp_global" in with_lanes.script()
    without, _ = schedule_func(func, default_rules(NEON32))
    assert "pad_temp_global" not in without.script()


@pytest.mark.parametrize(
    ("groups", "rule"), [(1, "conv2d-nhwc"), (48, "depthwise-conv2d-nhwc"), (6, RULE), (24, RULE)]
)  # fmt: skip
def test_each_convolution_goes_to_its_own_rule(groups, rule):
    func = conv_kernel(kernel=3, channels=48, filters=48, groups=groups, size=14)
    assert schedule_func(func, default_rules(AVX512))[1] == rule


def test_channel_multiplier_depthwise_is_grouped():
    """One input channel and two output channels per group: ``pad[..., f // 2 + rc]``."""
    func = conv_kernel(kernel=3, channels=16, filters=32, groups=16, size=12)
    scheduled, rule = schedule_func(func, default_rules(AVX512))
    assert rule == RULE
    assert_computes_the_same(func, scheduled)


class GroupedNet(nn.Module):
    """Grouped convolutions with bias and ReLU: widths 8 -> 12 (stride 2), 8, 24, 16 (1x1)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(32, 48, 3, stride=2, padding=1, groups=4), nn.ReLU(),
            nn.Conv2d(48, 48, 3, padding=1, groups=6), nn.ReLU(),
            nn.Conv2d(48, 48, 3, padding=1, groups=2), nn.ReLU(),
            nn.Conv2d(48, 64, 1, groups=4), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x):
        return self.layers(x)


SHAPE = (1, 32, 18, 18)


@pytest.fixture(scope="module")
def grouped_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("grouped") / "grouped.pt"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(GroupedNet().eval(), (torch.randn(*SHAPE),)), str(path))
    return edgec.load(path, input_shape=SHAPE)


def _grouped_kernels(manifest) -> list[str]:
    return [call["schedule"] for call in manifest["kernels"] if call["schedule"] == RULE]


def test_grouped_cnn_matches_onnxruntime_on_x86(grouped_model, tmp_path):
    result = edgec.compile(grouped_model, "x86", tmp_path / "x86")
    manifest = result.manifest
    assert manifest["verification"]["status"] == "passed"
    assert manifest["schedules"]["by_rule"].get(RULE) == 4
    assert len(_grouped_kernels(manifest)) == 4
    x = np.random.default_rng(5).standard_normal(SHAPE).astype("float32")
    got = LocalRunner(result.artifact).run([x])[0]
    want = run_onnxruntime(grouped_model.graph, [x])[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["cortex-a53", "cortex-a7"])
def test_grouped_cnn_verified_on_the_emulated_board(grouped_model, target, tmp_path):
    result = edgec.compile(grouped_model, target, tmp_path / target)
    assert result.manifest["schedules"]["by_rule"].get(RULE) == 4
    assert_board_verified(result.manifest, target)
