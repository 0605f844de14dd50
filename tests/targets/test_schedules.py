"""The CPU schedule library (targets/schedules): each rule on a kernel it must
match, the kernels it must leave to others, the graph preparation, numerics
of compiled small models against ONNX Runtime with schedules on, ARM
cross-compiles, ``--no-schedules`` and ``--threads``. No timing assertions:
speed is measured by bench/compare.py.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import edgec
from edgec.cli import cli
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import run_onnxruntime
from edgec.targets import PRESETS, resolve
from edgec.targets.schedules import default_rules, first_schedule, schedule_func
from edgec.targets.schedules.common import register_tile, vector_tile
from edgec.targets.schedules.graph import batch_norm_scale_shift, elementwise_clip_kind, padded_channels
from edgec.targets.vector import CpuVector, cpu_vector

AVX512 = CpuVector(lanes=16, registers=32)
NEON32 = CpuVector(lanes=4, registers=16)
RTOL = ATOL = 1e-4


# --- kernels, written as LegalizeOps writes them (TOPI compute -> PrimFunc) -----------------


def _prim_func(tensors):
    from tvm import te

    return te.create_prim_func(tensors)


def conv_kernel(kernel=1, stride=1, channels=32, filters=64, size=14, relu=True, groups=1, layout="NHWC"):
    from tvm import te, topi

    if layout == "NHWC":
        data = te.placeholder((1, size, size, channels), name="x")
        weight = te.placeholder((kernel, kernel, channels // groups, filters), name="w")
        bias = te.placeholder((1, 1, 1, filters), name="b")
        out = topi.nn.conv(data, weight, stride, kernel // 2, 1, groups, "NHWC", "HWIO")
    else:
        data = te.placeholder((1, channels, size, size), name="x")
        weight = te.placeholder((filters, channels // groups, kernel, kernel), name="w")
        bias = te.placeholder((1, filters, 1, 1), name="b")
        out = topi.nn.conv(data, weight, stride, kernel // 2, 1, groups, "NCHW", "OIHW")
    out = topi.add(out, bias)
    if relu:
        out = topi.nn.relu(out)
    return _prim_func([data, weight, bias, out])


def dense_kernel(rows=1, depth=512, columns=1000):
    from tvm import te, topi

    a = te.placeholder((rows, depth), name="a")
    b = te.placeholder((depth, columns), name="b")
    bias = te.placeholder((columns,), name="bias")
    return _prim_func([a, b, bias, topi.add(topi.matmul(a, b), bias)])


def max_pool_kernel():
    from tvm import te, topi

    data = te.placeholder((1, 56, 56, 64), name="x")
    return _prim_func([data, topi.nn.pool2d(data, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), "max", layout="NHWC")])


def global_mean_kernel():
    from tvm import te, topi

    data = te.placeholder((1, 14, 14, 1024), name="x")  # relax.mean legalizes to sum, then divide
    return _prim_func([data, topi.divide(topi.sum(data, axis=(1, 2), keepdims=True), 196.0)])


def transpose_kernel(channels=3):
    from tvm import te, topi

    data = te.placeholder((1, channels, 64, 64), name="x")
    return _prim_func([data, topi.transpose(data, (0, 2, 3, 1))])


def wide_transpose_kernel():
    return transpose_kernel(channels=16)


def concat_kernel():
    from tvm import te, topi

    a = te.placeholder((1, 16, 16, 16), name="a")
    b = te.placeholder((1, 16, 16, 24), name="b")
    return _prim_func([a, b, topi.concatenate([a, b], axis=3)])


def loop_kinds(func) -> set[str]:
    """Names of the loop kinds in a PrimFunc: serial, parallel, vectorized, unrolled."""
    import tvm_ffi
    from tvm import tirx

    kinds: set[str] = set()

    def visit(loop):
        kinds.add(tirx.ForKind(int(loop.kind)).name.lower())

    tvm_ffi.structural_walk(func.body, [(tirx.For, visit)], order="post")
    return kinds


def _rule(name, vector=AVX512):
    return next(rule for rule in default_rules(vector) if rule.name == name)


MATCHES = [
    ("conv2d-nhwc", lambda: conv_kernel(kernel=1)),
    ("conv2d-nhwc", lambda: conv_kernel(kernel=3, stride=2, channels=16, filters=24, size=15)),
    ("conv2d-nhwc", lambda: conv_kernel(kernel=7, stride=2, channels=3, filters=64, size=32, relu=False)),
    ("depthwise-conv2d-nhwc", lambda: conv_kernel(kernel=3, channels=64, filters=64, groups=64, size=28)),
    ("depthwise-conv2d-nhwc", lambda: conv_kernel(kernel=3, stride=2, channels=48, filters=48, groups=48, size=57)),
    ("dense", lambda: dense_kernel()),
    ("dense", lambda: dense_kernel(rows=4, depth=64, columns=1000)),
    ("pool-reduce", max_pool_kernel),
    ("pool-reduce", global_mean_kernel),
    ("generic", transpose_kernel),
    ("generic", wide_transpose_kernel),
    ("generic", concat_kernel),
]


@pytest.mark.parametrize(("rule_name", "make"), MATCHES, ids=[f"{name}-{i}" for i, (name, _) in enumerate(MATCHES)])
@pytest.mark.parametrize("vector", [AVX512, NEON32], ids=["avx512", "neon32"])
def test_rule_schedules_its_kernel(rule_name, make, vector):
    func = make()
    assert loop_kinds(func) == {"serial"}  # LegalizeOps' naive loop nest
    rules = default_rules(vector)
    scheduled, applied = schedule_func(func, rules)
    assert applied == rule_name  # the first rule that matches is the family's own
    kinds = loop_kinds(scheduled)
    assert "parallel" in kinds
    if make is transpose_kernel:  # 3 channels innermost: pixel by pixel, channels unrolled (schedule_injective)
        assert "unrolled" in kinds and "vectorized" not in kinds
    elif rule_name != "generic" or make is wide_transpose_kernel:
        assert "vectorized" in kinds
    assert bool(scheduled.attrs["tirx.is_scheduled"])


@pytest.mark.parametrize(
    ("rule_name", "make"),
    [
        ("conv2d-nhwc", lambda: conv_kernel(layout="NCHW")),  # NCHW: not channels last
        ("conv2d-nhwc", lambda: conv_kernel(kernel=3, channels=32, filters=32, groups=32)),  # depthwise
        ("depthwise-conv2d-nhwc", lambda: conv_kernel(kernel=3)),  # dense conv
        ("depthwise-conv2d-nhwc", lambda: conv_kernel(kernel=3, channels=32, filters=32, groups=8)),  # grouped
        ("grouped-conv2d-nhwc", lambda: conv_kernel(kernel=3)),  # dense conv
        ("grouped-conv2d-nhwc", lambda: conv_kernel(kernel=3, channels=32, filters=32, groups=32)),  # depthwise
        ("grouped-conv2d-nhwc", lambda: conv_kernel(kernel=3, channels=32, filters=32, groups=8, layout="NCHW")),
        ("dense", lambda: conv_kernel(kernel=1)),
        ("pool-reduce", transpose_kernel),  # no reduction
    ],
)
def test_rule_leaves_other_kernels_alone(rule_name, make):
    assert _rule(rule_name).apply(make()) is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: conv_kernel(layout="NCHW"),
        lambda: conv_kernel(kernel=3, channels=32, filters=32, groups=8, layout="NCHW"),
    ],
    ids=["conv-nchw", "grouped-conv-nchw"],
)
def test_unmatched_kernels_still_get_the_generic_schedule(make):
    scheduled, applied = schedule_func(make(), default_rules(AVX512))
    assert applied == "generic"
    assert "parallel" in loop_kinds(scheduled)


@pytest.mark.parametrize(
    "make",
    [
        lambda: conv_kernel(kernel=3, stride=2, channels=16, filters=24, size=15),
        lambda: conv_kernel(kernel=3, channels=24, filters=24, groups=24, size=13),
        lambda: dense_kernel(rows=3, depth=40, columns=1000),
        max_pool_kernel,
        global_mean_kernel,
        concat_kernel,
        transpose_kernel,
        lambda: conv_kernel(kernel=7, stride=2, channels=3, filters=64, size=32, relu=False),
        lambda: conv_kernel(layout="NCHW"),
    ],
    ids=["conv3x3s2", "depthwise", "dense", "maxpool", "mean", "concat", "transpose-rgb", "conv7x7s2-rgb", "generic-nchw-conv"],
)
def test_scheduled_kernel_computes_what_the_naive_one_does(make):
    func = make()
    scheduled, rule = schedule_func(func, default_rules(cpu_vector(resolve("x86"))))
    assert rule is not None
    assert_computes_the_same(func, scheduled)


def assert_rule_computes_the_same(func, rule_name: str, vector=None):
    """``func`` scheduled by the library for ``vector`` (default: this x86 machine's) is scheduled by
    the rule ``rule_name`` and computes what the naive kernel does (``assert_computes_the_same``)."""
    sch, rule = first_schedule(func, default_rules(vector or cpu_vector(resolve("x86"))))
    assert rule == rule_name
    assert_computes_the_same(func, sch.mod["main"])


def assert_computes_the_same(func, scheduled):
    """Build both PrimFuncs for this machine, run them on the same seeded inputs, compare outputs:
    float32 within RTOL/ATOL; integer kernels exactly, their inputs drawn from the 8-bit codes'
    range (int8 weights stored wider keep int8 values)."""
    import tvm

    target = resolve("x86").tvm_target()
    rng = np.random.default_rng(0)
    types = [param.ty for param in func.params]
    shapes = [[int(d) for d in ty.shape] for ty in types]
    arrays = [_seeded(rng, shape, str(ty.dtype)) for shape, ty in zip(shapes[:-1], types[:-1], strict=True)]
    out_dtype = str(types[-1].dtype)
    results = []
    for candidate in (func, scheduled):
        library = tvm.tirx.build(tvm.IRModule({"main": candidate.with_attr("global_symbol", "main")}), target=target)
        tensors = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.tensor(np.zeros(shapes[-1], out_dtype))]
        library["main"](*tensors)
        results.append(tensors[-1].numpy())
    if np.issubdtype(np.dtype(out_dtype), np.integer):
        np.testing.assert_array_equal(results[1], results[0])
    else:
        np.testing.assert_allclose(results[1], results[0], rtol=RTOL, atol=ATOL)


def _seeded(rng, shape: list[int], dtype: str) -> np.ndarray:
    if dtype.startswith("uint"):
        return rng.integers(0, 256, shape).astype(dtype)
    if dtype.startswith("int"):
        return rng.integers(-127, 128, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def test_tiny_kernels_stay_on_one_thread():
    scheduled, rule = schedule_func(dense_kernel(rows=1, depth=64, columns=48), default_rules(AVX512))
    assert rule == "dense"
    assert "vectorized" in loop_kinds(scheduled) and "parallel" not in loop_kinds(scheduled)


def test_register_tile_fits_the_register_file_and_divides_the_axes():
    for vector in (AVX512, CpuVector(8, 16), NEON32, CpuVector(4, 32)):
        for rows, channels in [([112, 112], 32), ([7, 7], 1280), ([13, 13], 1000), ([1], 1000), ([55, 55], 24)]:
            factors, tile = register_tile(rows, channels, vector)
            assert all(extent % factor == 0 for extent, factor in zip(rows, factors, strict=True))
            assert channels % tile == 0
            accumulators = int(np.prod(factors)) * -(-tile // vector.lanes)
            assert accumulators <= vector.accumulators
    assert vector_tile(24, AVX512) == [8]  # no whole 16-lane vector divides 24
    assert vector_tile(96, AVX512) == [16, 32, 48]


def test_vector_shape_is_preset_data_or_the_host():
    a7, a53 = cpu_vector(resolve("cortex-a7")), cpu_vector(resolve("cortex-a53"))
    assert (a7.lanes, a7.registers, a7.word_bits) == (4, 16, 32)
    assert (a53.lanes, a53.registers, a53.word_bits) == (4, 32, 64)
    assert cpu_vector(resolve("cortex-a72")).lanes == 4
    host = cpu_vector(resolve("x86"))
    assert PRESETS["x86"].vector_lanes is None
    assert (host.lanes, host.registers) in {(16, 32), (8, 16), (4, 16)}


# --- graph preparation -----------------------------------------------------------------------


def test_batch_norm_scale_shift_is_the_inference_formula():
    rng = np.random.default_rng(1)
    gamma, beta, mean = (rng.standard_normal(8).astype("float32") for _ in range(3))
    var = rng.uniform(0.1, 2.0, 8).astype("float32")
    x = rng.standard_normal((4, 8)).astype("float32")
    scale, shift = batch_norm_scale_shift(gamma, beta, mean, var, 1e-5)
    want = (x - mean) / np.sqrt(var + 1e-5) * gamma + beta
    np.testing.assert_allclose(x * scale + shift, want, rtol=1e-5, atol=1e-5)
    assert scale.dtype == np.float32


def test_clip_call_tir_is_recognised_only_for_max_min_with_a_scalar():
    from tvm import te, topi

    x = te.placeholder((1, 4, 4, 8), name="x")
    bound = te.placeholder((), name="c")
    assert elementwise_clip_kind(_prim_func([x, bound, topi.maximum(x, bound)])) == "max"
    assert elementwise_clip_kind(_prim_func([x, bound, topi.minimum(x, bound)])) == "min"
    assert elementwise_clip_kind(_prim_func([x, bound, topi.add(x, bound)])) is None
    y = te.placeholder((1, 4, 4, 8), name="y")
    assert elementwise_clip_kind(_prim_func([x, y, topi.maximum(x, y)])) is None


def test_output_channels_are_padded_to_whole_vectors_only_when_cheap():
    assert padded_channels(1000, 16) == 1008
    assert padded_channels(250, 8) == 256
    assert padded_channels(1024, 16) is None  # already whole vectors
    assert padded_channels(24, 16) is None  # 8 of 24 would be waste
    assert padded_channels(10, 4) is None


def test_wide_vectors_pad_a_third_more_channels():
    """With AVX-512 (16 lanes) a convolution of 24 or 40 output channels runs on whole vectors (32,
    48) and a slice: half-vector multiply-adds cost more than the zero channels (graph.py step 6)."""
    from tvm import relax

    from edgec.targets.schedules.graph import WIDE_PADDING_FRACTION, pad_output_channels

    assert padded_channels(24, 16, WIDE_PADDING_FRACTION) == 32 and padded_channels(40, 16, WIDE_PADDING_FRACTION) == 48
    assert padded_channels(8, 16, WIDE_PADDING_FRACTION) is None  # twice the work

    def slices(lanes: int, filters: int) -> int:
        x = relax.Var("x", relax.TensorType((1, 8, 8, 16), "float32"))
        weight = relax.const(np.ones((1, 1, 16, filters), "float32"))
        builder = relax.BlockBuilder()
        with builder.function("main", [x]):
            with builder.dataflow():
                out = builder.emit_output(relax.op.nn.conv2d(x, weight, data_layout="NHWC", kernel_layout="HWIO"))
            builder.emit_func_output(out)
        mod = pad_output_channels(lanes)(builder.get())
        return str(mod).count("strided_slice")

    assert slices(16, 24) == 1 and slices(16, 40) == 1  # AVX-512: padded
    assert slices(8, 20) == 0  # AVX2: 4 of 20 is more than an eighth, as before


def test_padded_conv_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(16, 250, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    path = tmp_path / "wide.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 16, 12, 12),), str(path), dynamo=False, opset_version=17)
    model = edgec.load(path)
    result = edgec.compile(model, "x86", tmp_path / "wide")
    assert result.manifest["verification"]["status"] == "passed"
    if 250 % cpu_vector(resolve("x86")).lanes:
        assert any("strided_slice" in call["kernel"] for call in result.manifest["kernels"])
    x = np.random.default_rng(2).standard_normal((1, 16, 12, 12)).astype("float32")
    got = LocalRunner(result.artifact).run([x])[0]
    np.testing.assert_allclose(got, run_onnxruntime(model.graph, [x])[0], rtol=RTOL, atol=ATOL)


# --- compiled small models against ONNX Runtime ------------------------------------------------


class Fire(nn.Module):
    def __init__(self, inputs: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(inputs, squeeze, 1), nn.ReLU())
        self.expand1x1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.expand3x3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.expand1x1(x), self.expand3x3(x)], 1)


class TinySqueezeNet(nn.Module):
    """SqueezeNet 1.1's shape at 1x3x32x32: ceil-mode max pools, Fire concats, 1x1 conv head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 8, 16), Fire(32, 8, 16), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(32, 12, 24),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Conv2d(48, classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


@pytest.fixture(scope="module")
def squeezenet_onnx(tmp_path_factory):
    torch.manual_seed(0)
    module = TinySqueezeNet().eval()
    path = tmp_path_factory.mktemp("squeezenet") / "squeezenet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])  # fmt: skip
    return path


def _model_file(name, saved_models, squeezenet_onnx):
    return squeezenet_onnx if name == "squeezenet" else saved_models[name].files["onnx"]


EXPECTED_RULES = {
    "mobilenet": {"conv2d-nhwc", "depthwise-conv2d-nhwc", "dense", "pool-reduce"},
    "resnet": {"conv2d-nhwc", "dense", "pool-reduce"},
    "squeezenet": {"conv2d-nhwc", "pool-reduce", "generic"},
    "mlp": {"dense"},
}


@pytest.mark.parametrize("name", list(EXPECTED_RULES))
def test_scheduled_model_matches_onnxruntime(name, saved_models, squeezenet_onnx, tmp_path):
    model = edgec.load(_model_file(name, saved_models, squeezenet_onnx))
    result = edgec.compile(model, "x86", tmp_path / name)
    manifest = result.manifest
    assert manifest["verification"]["status"] == "passed"
    summary = manifest["schedules"]
    assert summary["library"] == "edgec"
    assert EXPECTED_RULES[name] <= set(summary["by_rule"])
    assert "none" not in summary["by_rule"]  # every kernel got a schedule
    assert all(call["schedule"] for call in manifest["kernels"])
    rng = np.random.default_rng(3)
    x = rng.standard_normal(manifest["inputs"][0]["shape"]).astype("float32")
    got = LocalRunner(result.artifact).run([x])
    want = run_onnxruntime(model.graph, [x])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_no_schedules_is_the_default_relax_build(saved_models, tmp_path):
    model = edgec.load(saved_models["resnet"].files["onnx"])
    result = edgec.compile(model, "x86", tmp_path / "plain", schedules=False)
    assert result.manifest["schedules"]["library"] is None
    assert set(result.manifest["schedules"]["by_rule"]) == {"none"}
    assert result.manifest["verification"]["status"] == "passed"


@pytest.mark.parametrize("target", ["cortex-a7", "cortex-a53"])
def test_arm_cross_compile_lowers_the_schedules(target, saved_models, tmp_path):
    preset = PRESETS[target]
    if shutil.which(preset.toolchain.compiler) is None:
        pytest.skip(f"{preset.toolchain.compiler} is not installed (make toolchains)")
    model = edgec.load(saved_models["mobilenet"].files["onnx"])
    result = edgec.compile(model, target, tmp_path / target)
    header = (result.artifact.path / "lib.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert header[4] == (1 if preset.elf_bits == 32 else 2)
    assert int.from_bytes(header[18:20], "little") == (40 if target == "cortex-a7" else 183)  # EM_ARM, EM_AARCH64
    summary = result.manifest["schedules"]
    assert {"conv2d-nhwc", "depthwise-conv2d-nhwc", "dense"} <= set(summary["by_rule"])
    assert "none" not in summary["by_rule"]


# --- command line ----------------------------------------------------------------------------


def test_cli_compile_no_schedules_and_threads(saved_models, tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", os.environ.get("TVM_NUM_THREADS", "1"))
    output = tmp_path / "mlp"
    done = CliRunner().invoke(
        cli,
        ["compile", str(saved_models["mlp"].files["onnx"]), "-t", "x86", "-o", str(output),
         "--no-schedules", "--tuning-db", "none", "--threads", "3", "--json"],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["schedules"]["library"] is None
    assert manifest["schedules"]["tuning_db"] is None
    assert os.environ["TVM_NUM_THREADS"] == "3"


def test_shallow_lane_reduction_tile_fits_two_steps_of_inputs():
    """A 1x1 convolution over at most PAIRED_LANE_STEPS lane steps: LLVM unrolls its reduction by 2
    and pairs both steps' input loads, so the tile leaves registers for both (MobileNetV2's 16 -> 96
    at 112x112: 7 x 3 vectors spilled, 21 + 14 + 3 > 32); deeper reductions keep the wider tile."""
    from edgec.targets.schedules.conv2d import PAIRED_LANE_STEPS, conv_tile
    from edgec.targets.vector import CpuVector

    vector = CpuVector(lanes=4, registers=32, lane_fma=True)
    for depth in (16, 24, 32):
        assert depth // vector.lanes <= PAIRED_LANE_STEPS
        lane, _, _, (rows, channels) = conv_tile(vector, [112, 112], 96, depth, True)
        points, vectors = rows[0] * rows[1], channels // vector.lanes
        assert lane and points * vectors + 2 * points + vectors <= vector.registers
    _, _, _, (rows, channels) = conv_tile(vector, [56, 56], 24, 144, True)
    assert rows[0] * rows[1] * channels // vector.lanes == 21


def test_broadcast_tile_keeps_registers_free_on_avx512():
    """Without a lane multiply-add (x86) a tile holds at most BROADCAST_TILE_ACCUMULATORS: the
    2 x 4 pixel x 3 vector tile of a 28x28 40 -> 240 1x1 went through the stack (conv2d.py); the
    lane tiles (aarch64) keep their budget, armv7's 16 registers hold fewer anyway."""
    from edgec.targets.schedules.conv2d import BROADCAST_TILE_ACCUMULATORS, conv_tile
    from edgec.targets.vector import CpuVector

    assert conv_tile(AVX512, [28, 28], 240, 40, False)[3] == ([1, 7], 48)
    assert conv_tile(AVX512, [56, 56], 144, 24, False)[3] == ([1, 7], 48)
    assert conv_tile(AVX512, [7, 7], 1152, 192, False)[3] == ([1, 7], 48)  # 21 already
    for rows, channels, depth in [([28, 28], 240, 40), ([112, 112], 96, 16), ([14, 14], 128, 40)]:
        (y, x), tile = conv_tile(AVX512, rows, channels, depth, False)[3]
        assert y * x * tile // AVX512.lanes <= BROADCAST_TILE_ACCUMULATORS
    # a CPU with a lane multiply-add chooses as before (its own budget)
    lane_vector = CpuVector(lanes=4, registers=32, lane_fma=True)
    assert conv_tile(lane_vector, [28, 28], 128, 128, True)[3] == ([2, 4], 8)
