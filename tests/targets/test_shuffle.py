"""``schedules/shuffle.py``: ShuffleNet's channel shuffle, split and concat stay
channels-last. Checked: the shuffle's permutation against torch's own view /
transpose / view, the graph after the CPU graph passes (no layout fence, no
fallback, no NCHW <-> NHWC transpose but the input's), the transpose sinking
rules' numbers on a small Relax module, and a small ShuffleNetV2 compiled for
x86 and cortex-a53 against ONNX Runtime (ARM on the emulated board).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from backbone import assert_board_verified  # tests/ is on the path
from torch import nn

import edgec
from edgec.core.fallbacks import FallbackLog
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import run_onnxruntime
from edgec.targets.schedules import default_rules, schedule_func
from edgec.targets.schedules.shuffle import shuffle_groups, shuffle_permutation, sink_transposes
from edgec.targets.vector import CpuVector
from test_grouped import _loops  # tests/targets is on the path
from test_schedules import _prim_func, assert_computes_the_same

SHAPE = (1, 3, 32, 32)
SHUFFLES = 4  # channel shuffles in ShuffleNetSmall


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 channel shuffle."""
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width)
    return torch.transpose(x, 1, 2).contiguous().view(batch, channels, height, width)


@pytest.mark.parametrize(("channels", "groups"), [(48, 2), (12, 3), (16, 4), (6, 2)])
def test_permutation_is_torchs_channel_shuffle(channels, groups):
    x = torch.arange(2 * channels * 3, dtype=torch.float32).reshape(2, channels, 3, 1)
    index = shuffle_permutation(channels, groups)
    np.testing.assert_array_equal(x.numpy()[:, index], channel_shuffle(x, groups).numpy())
    assert shuffle_groups(index) == groups


def test_other_permutations_are_not_shuffles():
    assert shuffle_groups(np.arange(8)) is None
    assert shuffle_groups(np.array([1, 0, 3, 2, 5, 4, 7, 6])) is None
    assert shuffle_groups(np.arange(8)[::-1].copy()) is None


class Block(nn.Module):
    """ShuffleNetV2's unit: stride 1 splits the channels in halves, stride 2 has two branches."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.stride = stride
        half = outputs // 2
        if stride == 2:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inputs, inputs, 3, 2, 1, groups=inputs), nn.BatchNorm2d(inputs),
                nn.Conv2d(inputs, half, 1), nn.BatchNorm2d(half), nn.ReLU(),
            )  # fmt: skip
        branch_inputs = inputs if stride == 2 else half
        self.branch2 = nn.Sequential(
            nn.Conv2d(branch_inputs, half, 1), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, stride, 1, groups=half), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetSmall(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Block(16, 32, 2), Block(32, 32, 1), Block(32, 32, 1), Block(32, 64, 2))
        self.head = nn.Sequential(nn.Conv2d(64, 40, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def _randomised(module: nn.Module) -> nn.Module:
    """Seeded weights and BN statistics that are not identities."""
    torch.manual_seed(0)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.5, 0.5)
    return module.eval()


@pytest.fixture(scope="module")
def shufflenet(tmp_path_factory):
    path = tmp_path_factory.mktemp("shufflenet") / "shufflenet.pt"
    module = _randomised(ShuffleNetSmall())
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(module, (torch.randn(*SHAPE),)), str(path))
    return edgec.load(path, input_shape=SHAPE)


def _calls(func, name: str) -> list:
    from tvm import relax

    calls = []
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and getattr(value.op, "name", None) == name:
                calls.append(value)
    return calls


def _graph(model, passes):
    import tvm

    from edgec.lower import to_relax
    from edgec.targets import resolve

    target = resolve("x86")
    with target.tvm_target():
        return tvm.transform.Sequential(passes)(to_relax(model.graph, target))["main"]


def test_graph_passes_leave_no_layout_transpose_and_no_fence(shufflenet):
    from edgec.targets.schedules import graph_passes
    from edgec.targets.schedules.layout import convert_layout
    from edgec.targets.schedules.graph import DESIRED_LAYOUTS
    fenced = FallbackLog()
    _graph(shufflenet, [convert_layout(DESIRED_LAYOUTS, fenced)])
    assert [record.rule for record in fenced] == ["graph:layout"] * 2  # the layout pass alone: the rank-5 reshapes
    fallbacks = FallbackLog()
    main = _graph(shufflenet, graph_passes(CpuVector(lanes=16, registers=32), fallbacks))
    assert fallbacks.as_list() == []
    permutes = [[int(axis) for axis in call.attrs.axes] for call in _calls(main, "relax.permute_dims")]
    # the input's, each shuffle's (last axis), and the flatten's of the pooled 1x1 pixel
    assert permutes == [[0, 2, 3, 1]] + [[0, 1, 2, 4, 3]] * SHUFFLES + [[0, 3, 1, 2]]
    assert [int(dim) for dim in _calls(main, "relax.permute_dims")[-1].args[0].ty.shape] == [1, 1, 1, 40]
    assert _calls(main, "relax.take") == []
    assert all(int(call.attrs.axis) == 3 for call in _calls(main, "relax.concat"))
    slices = _calls(main, "relax.strided_slice")
    # the blocks' four channel splits, and the head's 40 channels computed as 48 (16 lanes, graph step 6)
    assert len(slices) == 5 and all([int(axis.value) for axis in call.args[1].fields] == [3] for call in slices)


def test_sinking_keeps_the_numbers():
    """permute_dims -> take / strided_slice / concat: the transposes move down and cancel."""
    import tvm
    from tvm import relax

    rng = np.random.default_rng(3)
    x = relax.Var("x", relax.TensorType((1, 5, 6, 8), "float32"))
    index = relax.const(np.array([3, 1, 7, 0, 2, 6, 5, 4], "int64"))  # not a group shuffle: stays a take
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            nchw = builder.emit(relax.op.permute_dims(x, [0, 3, 1, 2]))
            taken = builder.emit(relax.op.take(nchw, index, axis=1))
            low = builder.emit(relax.op.strided_slice(taken, axes=[1], begin=[0], end=[3]))
            high = builder.emit(relax.op.strided_slice(nchw, axes=[1], begin=[2], end=[8], strides=[2]))
            joined = builder.emit(relax.op.concat([low, high], axis=1))
            out = builder.emit_output(relax.op.permute_dims(joined, [0, 2, 3, 1]))
        builder.emit_func_output(out)
    before = builder.get()
    after = sink_transposes()(before.clone())
    assert _calls(after["main"], "relax.permute_dims") == []
    assert int(_calls(after["main"], "relax.take")[0].attrs.axis) == 3
    data = rng.standard_normal((1, 5, 6, 8)).astype("float32")
    results = []
    for mod in (before, after):
        vm = relax.VirtualMachine(relax.build(mod, target="llvm"), tvm.cpu())
        results.append(vm["main"](tvm.runtime.tensor(data)).numpy())
    np.testing.assert_array_equal(results[0], results[1])
    want = np.concatenate([data[..., [3, 1, 7]], data[..., 2:8:2]], axis=3)
    np.testing.assert_array_equal(results[1], want)


def _layout_fallbacks(manifest) -> list:
    return [record for record in manifest["schedules"]["fallbacks"] if record["rule"].startswith("graph:")]


def _layout_transposes(manifest) -> list[str]:
    """Kernels that turn a 4-D argument NCHW -> NHWC or back (shape ``(n, c, h, w)`` to ``(n, h, w,
    c)`` or the reverse), but the input's and the flatten's of the pooled 1x1 pixel."""

    def changes_layout(call) -> bool:
        out = call["outputs"][0]["shape"]
        for arg in call["args"]:
            n, a, b, c = arg["shape"] if len(arg["shape"]) == 4 else (None,) * 4
            if n is not None and out != arg["shape"] and out in ([n, b, c, a], [n, c, a, b]):
                return arg["shape"] not in (list(SHAPE), [1, 1, 1, 40])
        return False

    return [call["kernel"] for call in manifest["kernels"] if changes_layout(call)]


def test_small_shufflenet_matches_onnxruntime_on_x86(shufflenet, tmp_path):
    result = edgec.compile(shufflenet, "x86", tmp_path / "x86")
    manifest = result.manifest
    assert manifest["verification"]["status"] == "passed"
    assert _layout_fallbacks(manifest) == []
    assert _layout_transposes(manifest) == []
    x = np.random.default_rng(5).standard_normal(SHAPE).astype("float32")
    got = LocalRunner(result.artifact).run([x])[0]
    want = run_onnxruntime(shufflenet.graph, [x])[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_small_shufflenet_verified_on_the_emulated_cortex_a53(shufflenet, tmp_path):
    result = edgec.compile(shufflenet, "cortex-a53", tmp_path / "a53")
    assert _layout_fallbacks(result.manifest) == []
    assert _layout_transposes(result.manifest) == []
    assert_board_verified(result.manifest, "cortex-a53")


@pytest.mark.parametrize(("vector", "lanes"), [(CpuVector(lanes=4, registers=16), 4), (CpuVector(lanes=16, registers=32), 8)])
def test_a_channel_slice_loads_whole_vectors_pixel_by_pixel(vector, lanes):
    """NHWC channels 24..48 of 48: the generic rule runs the pixels in parallel and each pixel's
    24 channels as vectors inside them (AVX-512: 8 lanes, 24 is no multiple of 16), so a
    vector's index is affine, not a flattened loop's ``% 24``."""
    from tvm import te, topi
    from tvm.tirx import ForKind

    data = te.placeholder((1, 28, 28, 48), name="x")
    func = _prim_func([data, topi.strided_slice(data, [0, 0, 0, 24], [1, 28, 28, 48])])
    scheduled, rule = schedule_func(func, default_rules(vector))
    assert rule == "generic"
    loops = sorted((extent, kind) for extent, kind in _loops(scheduled).values())
    assert loops == sorted([(28 * 28, ForKind.PARALLEL), (24 // lanes, ForKind.SERIAL), (lanes, ForKind.VECTORIZED)])
    assert_computes_the_same(func, scheduled)
