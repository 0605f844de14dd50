"""Winograd convolutions (issue 14): the F(m x m, 3x3) math against direct
convolution, the per-layer policy, the Relax rewrite's structure (eligible
convolutions only, weights transformed at compile time, the output transform
fused with bias/BN/residual/ReLU), compiled numerics against ONNX Runtime on
x86 and on an emulated cortex-a53 board, and per-kernel fallbacks. No timing
assertions: bench/winograd.py measures speed.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import edgec
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import run_onnxruntime
from edgec.targets import PRESETS
from edgec.targets.schedules import winograd_kernels
from edgec.targets.schedules.winograd import transform_weights, winograd_conv2d_reference, winograd_matrices
from edgec.targets.schedules.winograd_graph import WinogradPolicy, winograd_conv2d
from edgec.targets.schedules.winograd_schedule import WinogradTransforms

RTOL = ATOL = 1e-4
F4 = WinogradPolicy(tiles=(4,), min_tiles=1)
F2 = WinogradPolicy(tiles=(2,), min_tiles=1)
F5 = WinogradPolicy(tiles=(5,), min_tiles=1)
F6 = WinogradPolicy(tiles=(6,), min_tiles=1)


# --- the math ------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3, 4, 5, 6])
def test_matrices_compute_a_one_dimensional_correlation(m):
    """F(m, 3): A^T [(G g) * (B^T d)] is the valid correlation of alpha inputs with 3 taps."""
    mats = winograd_matrices(m)
    rng = np.random.default_rng(m)
    d, g = rng.standard_normal(mats.alpha), rng.standard_normal(3)
    got = mats.A.T @ ((mats.G @ g) * (mats.B.T @ d))
    np.testing.assert_allclose(got, np.correlate(d, g, "valid"), rtol=1e-10, atol=1e-10)


def direct_conv2d(x, w, padding):
    """NHWC x HWIO, stride 1, ``padding`` (top, left, bottom, right), in float64."""
    top, left, bottom, right = padding
    padded = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = padded.shape[1] - 2, padded.shape[2] - 2
    out = np.zeros((x.shape[0], out_h, out_w, w.shape[3]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nhwc,cf->nhwf", padded[:, i : i + out_h, j : j + out_w], w[i, j].astype(np.float64))
    return out


@pytest.mark.parametrize("m", [2, 4, 5, 6])
@pytest.mark.parametrize(("size", "padding"), [((8, 8), (1, 1, 1, 1)), ((7, 5), (1, 1, 1, 1)), ((9, 6), (0, 0, 0, 0)),
                                               ((6, 7), (2, 1, 0, 1))])
def test_reference_matches_direct_convolution(m, size, padding):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *size, 5))
    w = rng.standard_normal((3, 3, 5, 7))
    np.testing.assert_allclose(winograd_conv2d_reference(x, w, padding, m), direct_conv2d(x, w, padding), rtol=1e-9, atol=1e-9)


def test_policy_picks_a_tile_per_layer():
    """ResNet-18's 3x3 stride-1 layers on x86: F(4x4) at 56 and 28, F(2x2) at 14, direct at 7
    (bench/winograd.py, first fit); on aarch64 the fewest estimated multiply-adds (README's
    instruction counts): F(4x4) at 56, F(6x6) at 28, F(5x5) at 14, F(4x4) at 7."""
    x86, a53 = PRESETS["x86"], PRESETS["cortex-a53"]
    assert (x86.winograd_min_tiles, x86.winograd_tiles, x86.winograd_transform_cost) == (49, (4, 2), None)
    with pytest.raises(ValueError, match="for_target"):
        WinogradPolicy().choose(1, 56, 56, 64, 64)
    policy = WinogradPolicy().for_target(x86.winograd_min_tiles, x86.winograd_tiles, x86.winograd_transform_cost)
    assert WinogradPolicy(min_tiles=3).for_target(49).min_tiles == 3  # an explicit value wins
    assert WinogradPolicy(tiles=(4,)).for_target(1, (6, 2), 2.0) == WinogradPolicy(tiles=(4,), min_tiles=1)  # explicit tiles: first fit
    arm = WinogradPolicy().for_target(a53.winograd_min_tiles, a53.winograd_tiles, a53.winograd_transform_cost)
    resnet = [(56, 64), (28, 128), (14, 256), (7, 512)]
    assert [arm.choose(1, size, size, width, width)[0] for size, width in resnet] == [4, 6, 5, 4]
    assert [policy.choose(1, size, size, width, width)[0] for size, width in resnet] == [4, 4, 2, None]
    m, why = policy.choose(1, 7, 7, 512, 512)
    assert m is None and "tiles" in why
    m, why = policy.choose(1, 56, 56, 8, 64)
    assert m is None and "channels" in why
    m, why = WinogradPolicy(tiles=(6, 4), min_tiles=1, transform_cost=2.0).choose(1, 2, 2, 64, 64)  # one tile: more than direct
    assert m is None and "direct" in why


def test_estimated_cost_counts_the_gemm_and_the_transform_terms():
    from edgec.targets.schedules.winograd import transform_terms

    assert transform_terms(4) == (2 * 6 * 26, (6 + 4) * 18)  # 312 and 180: winograd_kernels' docstring
    assert transform_terms(2) == (2 * 4 * 8, (4 + 2) * 6)
    bare, weighted = WinogradPolicy(tiles=(4,), min_tiles=1), WinogradPolicy(tiles=(4,), min_tiles=1, transform_cost=2.0)
    tiles = 2 * 2  # 7x7 outputs in tiles of 4: the partial ones cost whole tiles
    assert bare.estimated_cost(4, 1, 7, 7, 8, 16) == tiles * 36 * 8 * 16
    assert weighted.estimated_cost(4, 1, 7, 7, 8, 16) == tiles * (36 * 8 * 16 + 2.0 * (312 * 8 + 180 * 16))


# --- the rewrite ---------------------------------------------------------------------------------


def _relax_convs():
    """main(x): NHWC 3x3 stride 1 (+ bias, ReLU) -> 3x3 stride 2 -> 1x1, all with constant HWIO weights."""
    from tvm import relax

    rng = np.random.default_rng(0)
    weights = {
        "winograd": rng.standard_normal((3, 3, 16, 32)).astype("float32"),
        "strided": rng.standard_normal((3, 3, 32, 32)).astype("float32"),
        "pointwise": rng.standard_normal((1, 1, 32, 16)).astype("float32"),
    }
    bias = rng.standard_normal((1, 1, 1, 32)).astype("float32")
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 12, 12, 16), "float32"))

    def conv(data, name, **attrs):
        return relax.op.nn.conv2d(data, relax.const(weights[name]), data_layout="NHWC", kernel_layout="HWIO", **attrs)

    with builder.function("main", [x]):
        with builder.dataflow():
            y = builder.emit(conv(x, "winograd", padding=[1, 1, 1, 1]))
            y = builder.emit(relax.op.nn.relu(relax.op.add(y, relax.const(bias))))
            y = builder.emit(conv(y, "strided", strides=[2, 2], padding=[1, 1, 1, 1]))
            y = builder.emit_output(conv(y, "pointwise"))
        builder.emit_func_output(y)
    return builder.get(), weights


def _calls(mod) -> list:
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return found


def test_rewrite_replaces_the_eligible_convolution_only():
    import tvm
    from tvm import relax

    mod, weights = _relax_convs()
    assert relax.analysis.check_well_formed(mod)
    rewritten = winograd_conv2d(F4)(mod)
    assert relax.analysis.check_well_formed(rewritten)
    calls = _calls(rewritten)
    convs = [call for call in calls if getattr(call.op, "name", "") == "relax.nn.conv2d"]
    assert [tuple(int(s) for s in call.attrs.strides) for call in convs] == [(2, 2), (1, 1)]  # strided, 1x1 untouched
    kernels = [call.args[0].name_hint for call in calls if getattr(call.op, "name", "") == "relax.call_tir"]
    assert kernels == [winograd_kernels.INPUT_KERNEL, winograd_kernels.GEMM_KERNEL, winograd_kernels.OUTPUT_KERNEL]
    gemm = next(call for call in calls if getattr(call.op, "name", "") == "relax.call_tir" and call.args[0].name_hint == winograd_kernels.GEMM_KERNEL)
    constant = gemm.args[1].fields[1]
    assert isinstance(constant, tvm.ir.expr.Constant)  # weights transformed at compile time
    np.testing.assert_allclose(constant.value.numpy(), transform_weights(weights["winograd"], 4), rtol=1e-6)
    assert constant.value.numpy().shape == (36, 16, 32)
    assert int(rewritten[winograd_kernels.INPUT_KERNEL].attrs["op_pattern"]) == 8  # a kernel of its own

    fused = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                      relax.transform.FuseOps(), relax.transform.FuseTIR()])(rewritten)
    names = [gvar.name_hint for gvar in fused.get_global_vars()]
    assert "fused_conv2d_winograd_output_add_relu" in names  # bias and ReLU fused into the output transform
    assert winograd_kernels.INPUT_KERNEL in names


def test_policy_that_rejects_leaves_the_module_unchanged():
    from tvm import relax

    mod, _ = _relax_convs()
    rewritten = winograd_conv2d(WinogradPolicy(tiles=(4, 2), min_tiles=10_000))(mod)
    assert len([c for c in _calls(rewritten) if getattr(c.op, "name", "") == "relax.nn.conv2d"]) == 3
    assert not any(getattr(c.op, "name", "") == "relax.call_tir" for c in _calls(rewritten))
    assert relax.analysis.check_well_formed(rewritten)


# --- the transform kernels ------------------------------------------------------------------------


def _loop_kinds(sch, block) -> list[str]:
    from tvm import tirx

    return [tirx.ForKind(int(sch.get(loop).kind)).name.lower() for loop in sch.get_loops(block)]


@pytest.mark.parametrize("m", [2, 4, 5, 6])
def test_transforms_run_one_pass_per_axis_per_tile_and_channel_vector(m):
    """The first pass of each transform (the input's columns, the output's rows) is computed
    inside the tile and channel-vector loops of the second, unrolled and vectorised: its
    alpha^2 (or alpha*m) vectors stay in registers instead of a tensor in memory."""
    from tvm import te, topi

    from edgec.targets.vector import CpuVector

    mats, size, channels = winograd_matrices(m), 9, 16
    tiles = -(-size // m) ** 2
    rule = WinogradTransforms(CpuVector(lanes=4, registers=32, lane_fma=True))
    x = te.placeholder((1, size, size, channels), name="x")
    products = te.placeholder((mats.alpha**2, tiles, channels), name="M")
    kernels = {
        winograd_kernels.INPUT_COLUMNS: te.create_prim_func([x, winograd_kernels.input_transform(x, mats, (1, 1, 1, 1), (size, size))]),
        winograd_kernels.OUTPUT_ROWS: te.create_prim_func(
            [products, topi.nn.relu(winograd_kernels.output_transform(products, mats, 1, (size, size)))]),
    }
    for first_pass, func in kernels.items():
        sch = rule.apply(func)
        assert sch is not None
        kinds = _loop_kinds(sch, sch.get_sblock(first_pass))
        assert kinds[-4:] == ["unrolled", "unrolled", "unrolled", "vectorized"], kinds  # its own loops
        assert len(kinds) > 4, kinds  # under the tile and channel loops of the second pass


# --- compiled models -------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """Conv-BN-ReLU, conv-BN, + input, ReLU (ResNet's basic block) between a 3x3 stem to 16
    channels and a 1x1 head."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.head = nn.Conv2d(channels, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(self.conv2(self.conv1(x)) + x))


@pytest.fixture(scope="module")
def residual_onnx(tmp_path_factory):
    torch.manual_seed(0)
    net = ResidualBlock().eval()
    with torch.no_grad():
        for bn in (net.conv1[1], net.conv2[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("residual") / "residual.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 18, 18),), str(path), dynamo=False, opset_version=17)
    return path


def _kernels(manifest) -> dict[str, str | None]:
    return {call["kernel"]: call["schedule"] for call in manifest["kernels"]}


def _check_against_onnxruntime(model, result):
    x = np.random.default_rng(7).standard_normal((1, 3, 18, 18)).astype("float32")
    got = LocalRunner(result.artifact).run([x])[0]
    np.testing.assert_allclose(got, run_onnxruntime(model.graph, [x])[0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("policy", [F4, F2, F5, F6], ids=["F4x4", "F2x2", "F5x5", "F6x6"])
def test_winograd_model_matches_onnxruntime_on_x86(policy, residual_onnx, tmp_path):
    """18x18 outputs: F(4x4) and F(5x5) have a partial last tile row and column."""
    model = edgec.load(residual_onnx)
    result = edgec.compile(model, "x86", tmp_path / "out", winograd=policy)
    manifest = result.manifest
    assert manifest["verification"]["status"] == "passed"
    assert manifest["schedules"]["fallbacks"] == []
    kernels = _kernels(manifest)
    assert kernels[winograd_kernels.INPUT_KERNEL] == "winograd-transform"
    assert kernels[winograd_kernels.GEMM_KERNEL] == "dense"
    outputs = [name for name in kernels if name.startswith(f"fused_{winograd_kernels.OUTPUT_KERNEL}")]
    assert len(outputs) == 2 and all(kernels[name] == "winograd-transform" for name in outputs)
    assert any(name.endswith("relu") or "_relu" in name for name in outputs)
    assert any(name.count("add") >= 2 for name in outputs)  # BN shift + residual add fused too
    stem = [name for name in kernels if name.startswith("fused_conv2d_") and "winograd" not in name]
    assert stem and all(kernels[name] == "conv2d-nhwc" for name in stem)  # 3 input channels: direct
    _check_against_onnxruntime(model, result)


def test_without_winograd_every_convolution_is_direct(residual_onnx, tmp_path):
    model = edgec.load(residual_onnx)
    result = edgec.compile(model, "x86", tmp_path / "out", winograd=None)
    assert not any("winograd" in name for name in _kernels(result.manifest))
    assert result.manifest["verification"]["status"] == "passed"


def test_winograd_model_on_an_emulated_cortex_a53(residual_onnx, tmp_path):
    """Compile verification runs the aarch64 build on the board under qemu, against ONNX Runtime."""
    preset = PRESETS["cortex-a53"]
    if shutil.which(preset.toolchain.compiler) is None:
        pytest.skip(f"{preset.toolchain.compiler} is not installed (make toolchains)")
    model = edgec.load(residual_onnx)
    result = edgec.compile(model, "cortex-a53", tmp_path / "a53", winograd=F4)
    manifest = result.manifest
    assert manifest["verification"]["status"] == "passed", manifest["verification"]
    assert "emulated" in manifest["verification"]["ran_on"] or "aarch64" in manifest["verification"]["ran_on"]
    kernels = _kernels(manifest)
    assert kernels[winograd_kernels.INPUT_KERNEL] == "winograd-transform"
    assert manifest["schedules"]["fallbacks"] == []


# --- fallbacks -----------------------------------------------------------------------------------


def test_failing_rewrite_keeps_the_direct_convolution(residual_onnx, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("forced input transform failure")

    monkeypatch.setattr(winograd_kernels, "input_transform", broken)
    model = edgec.load(residual_onnx)
    result = edgec.compile(model, "x86", tmp_path / "out", winograd=F4)
    fallbacks = result.manifest["schedules"]["fallbacks"]
    # one record: the two 16 -> 16 convolutions have the same shapes (the log drops duplicates)
    assert fallbacks == [{"kernel": "relax.nn.conv2d(1x18x18x16, 3x3x16x16) -> 1x18x18x16", "rule": "graph:winograd",
                          "reason": "forced input transform failure"}]
    assert not any("winograd" in name for name in _kernels(result.manifest))
    assert result.manifest["verification"]["status"] == "passed"
    _check_against_onnxruntime(model, result)


def test_failing_transform_schedule_falls_back_for_those_kernels_only(residual_onnx, tmp_path, monkeypatch):
    matches = WinogradTransforms.apply

    def broken(self, func):
        if matches(self, func) is not None:  # fail on the kernels the rule is for, after scheduling them
            raise RuntimeError("forced schedule failure")

    monkeypatch.setattr(WinogradTransforms, "apply", broken)
    model = edgec.load(residual_onnx)
    result = edgec.compile(model, "x86", tmp_path / "out", winograd=F4)
    kernels = _kernels(result.manifest)
    failed = {f["kernel"] for f in result.manifest["schedules"]["fallbacks"] if f["rule"] == "winograd-transform"}
    assert winograd_kernels.INPUT_KERNEL in failed and any(winograd_kernels.OUTPUT_KERNEL in name for name in failed)
    assert all(kernels[name] == "generic" for name in failed), {name: kernels[name] for name in failed}  # the next rule took them
    assert kernels[winograd_kernels.GEMM_KERNEL] == "dense"
    assert result.manifest["verification"]["status"] == "passed"
    _check_against_onnxruntime(model, result)


def test_cli_default_and_no_winograd(residual_onnx, tmp_path, restore_logging):
    """The CLI's default policy gives the 16-channel 18x18 convs F(2x2) (81 tiles >= x86's 49);
    ``--no-winograd`` keeps every convolution direct. Both builds verify."""
    from click.testing import CliRunner

    from edgec.cli import cli

    kernels = {}
    for name, flags in (("default", []), ("direct", ["--no-winograd"])):
        done = CliRunner().invoke(cli, ["compile", str(residual_onnx), "-t", "x86", "-o", str(tmp_path / name), *flags])
        assert done.exit_code == 0, done.output
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["verification"]["status"] == "passed"
        kernels[name] = _kernels(manifest)
    assert kernels["default"][winograd_kernels.INPUT_KERNEL] == "winograd-transform"
    assert not any("winograd" in name for name in kernels["direct"])


class Fire(nn.Module):
    """SqueezeNet's Fire module: a 1x1 squeeze, then 1x1 and 3x3 expands concatenated on channels."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.expand1 = nn.Sequential(nn.Conv2d(channels, 2 * channels, 1), nn.ReLU())
        self.expand3 = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(4 * channels, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.cat([self.expand1(x), self.expand3(x)], 1))


@pytest.mark.parametrize("policy", [F4, F2], ids=["F4x4", "F2x2"])
def test_output_transform_fused_with_a_concatenation(policy, tmp_path):
    """FuseOps fuses the concatenation into the output transform's kernel; the rule used to give it up
    to 'generic', whose inlined concatenation recomputed the tile's transform for every element
    (SqueezeNet 1.1: 12 of its 41 ms). The concatenation now copies the transform's result."""
    torch.manual_seed(0)
    path = tmp_path / "fire.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Fire().eval(), (torch.randn(1, 3, 18, 18),), str(path), dynamo=False, opset_version=17)
    model = edgec.load(path)
    result = edgec.compile(model, "x86", tmp_path / "out", winograd=policy)
    kernels = _kernels(result.manifest)
    fused = [name for name in kernels if winograd_kernels.OUTPUT_KERNEL in name and "concatenate" in name]
    assert fused and all(kernels[name] == "winograd-transform" for name in fused)
    assert result.manifest["schedules"]["fallbacks"] == []
    _check_against_onnxruntime(model, result)
