"""Matrix-vector products on packed weights, x86 (targets/schedules/packed_matvec.py): a batch-1
matmul on constant ``[K, N]`` weights and a 1x1 convolution on one pixel read their weights packed
by the register tile's columns, ``P[n / T, k, n % T]``, the classifier's columns padded to whole
tiles.

Checked: the padding and tile choices, which products the rewrite takes (x86 only: the ARM
targets' CpuVector does not ask for it), the kernel on packed weights against NumPy under the
schedule library's ``dense`` rule, and a small network with a squeeze-excite block and a
1000-class classifier compiled for x86: packed kernels scheduled by the library, outputs equal to
ONNX Runtime's.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from backbone import require_host_features, traced_model  # tests/ is on the path
from torch import nn

import edgec
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import run_onnxruntime
from edgec.targets import resolve
from edgec.targets.schedules import default_rules, schedule_func
from edgec.targets.schedules.packed_matvec import conv_matvec_tile, matvec_packed, matvec_tile, padded_columns
from edgec.targets.schedules.packed_weights import pack_columns
from edgec.targets.vector import CpuVector, cpu_vector

AVX512 = CpuVector(lanes=16, registers=32, packed_matvec=True)
AVX2 = CpuVector(lanes=8, registers=16, packed_matvec=True)
SHAPE = (1, 3, 32, 32)


def _shape(*dims):
    from tvm import tirx

    return [tirx.IntImm("int64", d) for d in dims]


def _conv_call(data_shape, out_shape, groups=1):
    """What ``conv_matvec_tile`` reads of a Relax conv2d call."""
    attrs = SimpleNamespace(data_layout="NHWC", kernel_layout="HWIO", out_layout="NHWC", groups=groups)
    return SimpleNamespace(attrs=attrs, args=[SimpleNamespace(ty=SimpleNamespace(shape=_shape(*data_shape), dtype="float32"))],
                           ty=SimpleNamespace(shape=_shape(*out_shape), dtype="float32"))  # fmt: skip


def test_columns_pad_to_whole_tiles_of_four_vectors_else_whole_vectors():
    assert padded_columns(1000, 16) == 1024  # a 1000-class classifier: 16 tiles of 64
    assert padded_columns(1008, 16) == 1024
    assert padded_columns(1024, 16) == 1024
    assert padded_columns(144, 16) == 144  # 9 vectors: 192 would waste a third
    assert padded_columns(1000, 8) == 1024  # AVX2: tiles of 32
    assert padded_columns(250, 8) == 256
    assert padded_columns(24, 16) == 24  # 8 of 32 would be waste


def test_matvec_tile_takes_one_row_products_on_constant_matrices():
    weight = np.zeros((1024, 1000), np.float32)
    assert matvec_tile(AVX512, _shape(1, 1024), weight)[0] == (1024, 64)
    assert matvec_tile(AVX2, _shape(1, 1024), weight)[0] == (1024, 32)
    assert matvec_tile(AVX512, _shape(1, 576), np.zeros((576, 1024), np.float32))[0] == (1024, 64)
    assert matvec_tile(AVX512, _shape(8, 1024), weight)[0] is None  # a batch of 8 rows: the tile reuses weights
    assert matvec_tile(AVX512, _shape(1, 1024), None)[0] is None  # weights not a constant
    assert matvec_tile(AVX512, _shape(1, 1024), weight.astype(np.float64))[0] is None
    choice, why = matvec_tile(AVX512, _shape(1, 256), np.zeros((256, 64), np.float32))
    assert choice is None and "one register tile" in why  # its [K, N] rows are one contiguous run already


def test_conv_matvec_tile_takes_1x1_convolutions_whose_weights_are_streamed():
    weight = np.zeros((1, 1, 576, 144), np.float32)
    tile, why = conv_matvec_tile(AVX512, _conv_call((1, 1, 1, 576), (1, 1, 1, 144)), weight)
    assert tile == 48, why  # one pixel: 3 of its 9 vectors per tile
    assert conv_matvec_tile(AVX512, _conv_call((1, 1, 1, 144), (1, 1, 1, 576)), np.zeros((1, 1, 144, 576), np.float32))[0] == 64
    # 7x7x576 -> 144: 331,776 weight bytes against 112,896 input bytes, read weights-stationary
    assert conv_matvec_tile(AVX512, _conv_call((1, 7, 7, 576), (1, 7, 7, 144)), weight)[0] == 48
    tile, why = conv_matvec_tile(AVX512, _conv_call((1, 28, 28, 96), (1, 28, 28, 24)), np.zeros((1, 1, 96, 24), np.float32))
    assert tile is None and "reused" in why  # 9 KB of weights over 301 KB of input
    tile, why = conv_matvec_tile(AVX512, _conv_call((1, 7, 7, 576), (1, 7, 7, 144)), np.zeros((3, 3, 576, 144), np.float32))
    assert tile is None and "1x1" in why
    assert conv_matvec_tile(AVX512, _conv_call((1, 1, 1, 576), (1, 1, 1, 144), groups=4), weight)[0] is None
    assert conv_matvec_tile(AVX512, _conv_call((1, 1, 1, 16), (1, 1, 1, 8)), np.zeros((1, 1, 16, 8), np.float32))[0] is None


def test_spatial_convolutions_that_stream_their_weights_are_packed_after_winograd():
    """ResNet-18's 7x7x512 3x3 layers read 9.4 MB of weights for 100 KB of input: packed by the
    register tile's 32 output channels (one contiguous run per tile instead of 128 bytes every
    2 KB); the 1x1 ones were packed earlier (step 6a), a 3x3 layer whose input outweighs its
    weights is left alone."""
    deep = np.zeros((3, 3, 512, 512), np.float32)
    tile, why = conv_matvec_tile(AVX512, _conv_call((1, 7, 7, 512), (1, 7, 7, 512)), deep, spatial=True)
    assert tile == 32, why
    assert conv_matvec_tile(AVX512, _conv_call((1, 14, 14, 256), (1, 7, 7, 512)), deep[:, :, :256], spatial=True)[0] == 32
    tile, why = conv_matvec_tile(AVX512, _conv_call((1, 7, 7, 576), (1, 7, 7, 144)), np.zeros((1, 1, 576, 144), np.float32),
                                 spatial=True)  # fmt: skip
    assert tile is None and "packed earlier" in why
    tile, why = conv_matvec_tile(AVX512, _conv_call((1, 56, 56, 64), (1, 56, 56, 64)), np.zeros((3, 3, 64, 64), np.float32),
                                 spatial=True)  # fmt: skip
    assert tile is None and "reused" in why


class DeepStridedBlock(nn.Module):
    """A 3x3 stride-2 convolution 128 -> 128 on 8x8 (590 KB of weights, 32 KB of input: streamed),
    a 3x3 stride-1 one on its 4x4 output, and a residual add."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(128, 128, 3, 2, 1)
        self.conv = nn.Conv2d(128, 128, 3, 1, 1)

    def forward(self, x):
        y = torch.relu(self.down(x))
        return torch.relu(self.conv(y) + y)


def test_deep_3x3_convolutions_run_on_packed_weights_and_match_onnxruntime(tmp_path):
    model = traced_model(DeepStridedBlock(), (1, 128, 8, 8), tmp_path / "deep.pt")
    result = edgec.compile(model, "x86", tmp_path / "x86")
    manifest = result.manifest
    assert manifest["verification"]["status"] == "passed"
    packed = [call for call in manifest["kernels"] if "conv2d_packed" in call["kernel"]]
    assert len(packed) == 2 and all(call["schedule"] == "conv2d-nhwc" for call in packed), [c["kernel"] for c in manifest["kernels"]]
    assert all(call["args"][1]["shape"][1:3] == [3, 3] for call in packed)
    x = np.random.default_rng(2).standard_normal((1, 128, 8, 8)).astype("float32")
    got = LocalRunner(result.artifact).run([x])[0]
    np.testing.assert_allclose(got, run_onnxruntime(model.graph, [x])[0], rtol=1e-4, atol=1e-4)


def test_only_x86_asks_for_packed_matvec():
    assert cpu_vector(resolve("x86")).packed_matvec
    for arm in ("cortex-a7", "cortex-a53", "cortex-a72"):
        assert not cpu_vector(resolve(arm)).packed_matvec


@pytest.mark.parametrize("vector, depth, columns", [(AVX512, 1024, 1024), (AVX512, 576, 192), (AVX2, 200, 96)])
def test_packed_matvec_kernel_computes_the_product_under_the_dense_rule(vector, depth, columns):
    import tvm
    from tvm import te

    _, tile = matvec_tile(vector, _shape(1, depth), np.zeros((depth, columns), np.float32))[0]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1, depth)).astype("float32")
    b = rng.standard_normal((depth, columns)).astype("float32")
    data = te.placeholder((1, depth), name="a")
    packed = te.placeholder((columns // tile, depth, tile), name="P")
    func = te.create_prim_func([data, packed, matvec_packed(data, packed)])
    scheduled, rule = schedule_func(func, default_rules(vector))
    assert rule == "dense"  # the packed view is inlined and tiled like [K, N] weights
    library = tvm.tirx.build(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=resolve("x86").tvm_target())
    out = tvm.runtime.tensor(np.zeros((1, columns), "float32"))
    library["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(pack_columns(b, tile)), out)
    np.testing.assert_allclose(out.numpy(), a @ b, rtol=1e-4, atol=1e-4)


class SqueezeClassifier(nn.Module):
    """A stem, a squeeze-excite block (pool, 1x1 64 -> 16, ReLU, 1x1 16 -> 64, hard sigmoid, gate)
    and a classifier 64 -> 200 -> 1000, as MobileNetV3's end."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1), nn.Hardswish())
        self.fc1, self.fc2 = nn.Conv2d(64, 16, 1), nn.Conv2d(16, 64, 1)
        self.classifier = nn.Sequential(nn.Linear(64, 200), nn.Hardswish(), nn.Linear(200, 1000))

    def forward(self, x):
        x = self.stem(x)
        gate = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.classifier((x * gate).mean((2, 3)))


@pytest.fixture(scope="module")
def squeeze_classifier(tmp_path_factory):
    torch.manual_seed(0)
    return traced_model(SqueezeClassifier(), SHAPE, tmp_path_factory.mktemp("matvec") / "se.pt")


def test_squeeze_excite_and_classifier_run_packed_on_x86(squeeze_classifier, tmp_path):
    require_host_features("avx512f", why="the expected tiles are AVX-512's (16 lanes); AVX2's 8 lanes pack other shapes")
    result = edgec.compile(squeeze_classifier, "x86", tmp_path / "x86")
    manifest = result.manifest
    assert manifest["verification"]["status"] == "passed"
    kernels = {call["kernel"]: call for call in manifest["kernels"]}
    packed = {name: call for name, call in kernels.items() if "_packed" in name}
    convs = [call for name, call in packed.items() if "conv2d_packed" in name]
    matmuls = [call for name, call in packed.items() if "matmul_packed" in name]
    assert len(matmuls) == 2 and all(call["schedule"] == "dense" for call in matmuls)
    # 64 -> 16 and 16 -> 64 on one pixel: one register tile each (16, 64 columns), left alone
    assert convs == []
    classifier = [call for call in matmuls if call["outputs"][0]["shape"] == [1, 1000]]
    assert len(classifier) == 1 and "strided_slice" in classifier[0]["kernel"]  # 1000 -> 1024 columns, sliced
    assert [arg["shape"] for arg in classifier[0]["args"][:2]] == [[1, 200], [1024 // 64, 200, 64]]
    assert not [call for call in manifest["kernels"] if call["kernel"].startswith("fused_matmul") and "packed" not in call["kernel"]]
    assert manifest["schedules"]["fallbacks"] == []
    x = np.random.default_rng(5).standard_normal(SHAPE).astype("float32")
    got = LocalRunner(result.artifact).run([x])[0]
    want = run_onnxruntime(squeeze_classifier.graph, [x])[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_squeeze_excite_and_7x7_projection_are_packed(tmp_path):
    """MobileNetV3's widest squeeze-excite block, 576 -> 144 -> 576 on one pixel, and the 1x1
    projection after it, 576 -> 96 at 7x7 (221 KB of weights, 113 KB of input): all packed."""
    require_host_features("avx512f", why="the expected tiles are AVX-512's (16 lanes); AVX2's 8 lanes pack other shapes")

    class Squeeze(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(576, 144, 1), nn.Conv2d(144, 576, 1)
            self.project = nn.Conv2d(576, 96, 1)

        def forward(self, x):
            return self.project(x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))))

    torch.manual_seed(0)
    shape = (1, 576, 7, 7)
    model = traced_model(Squeeze(), shape, tmp_path / "squeeze.pt")
    result = edgec.compile(model, "x86", tmp_path / "x86")
    assert result.manifest["verification"]["status"] == "passed"
    packed = [call for call in result.manifest["kernels"] if "conv2d_packed" in call["kernel"]]
    assert sorted(tuple(call["args"][1]["shape"]) for call in packed) == [(2, 1, 1, 576, 48), (3, 1, 1, 576, 48), (9, 1, 1, 144, 64)]
    assert all(call["schedule"] == "conv2d-nhwc" for call in packed)
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    np.testing.assert_allclose(LocalRunner(result.artifact).run([x])[0], run_onnxruntime(model.graph, [x])[0], rtol=1e-4, atol=1e-4)
