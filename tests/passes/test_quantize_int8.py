"""Tests of passes/quantize_int8.py (``QuantizeInt8Pass``, ``-p quantize-int8``), its math
(passes/int8_math.py) and its calibration inputs (passes/calibration.py).

Numerics: ONNX Runtime on the QDQ graph against ONNX Runtime on the float
graph (a seeded CNN: within a few quantization steps of the output range), and
the accuracy of a CNN trained here on scikit-learn's digits, int8 against float.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import edgec
from edgec.core.errors import PassError
from edgec.core.model import Model
from edgec.passes import PASSES, FoldBatchNormPass, QuantizeInt8Pass
from edgec.passes.calibration import calibration_samples
from edgec.passes.int8_math import (
    Histogram,
    activation_quant,
    entropy_range,
    entropy_threshold,
    percentile_range,
    quantize_bias,
    quantize_weight,
)
from edgec.passes.registry import parse
from edgec.runtimes.reference import run_onnxruntime

from backbone import make_onnx  # noqa: E402 - tests/ on sys.path (conftest.py)

METHODS = ("minmax", "percentile", "entropy")


# --------------------------------------------------------------------------
# the math (pure NumPy)
# --------------------------------------------------------------------------


def test_quantize_weight_per_channel():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 4, 3, 3)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)[:, None, None, None]
    weight[2] = 0.0
    codes, scale = quantize_weight(weight, axis=0)
    assert codes.dtype == np.int8 and scale.shape == (6,) and scale.dtype == np.float32
    assert codes.min() >= -127 and codes.max() <= 127
    assert scale[2] == 1.0 and not codes[2].any()  # an all-zero channel: scale 1, codes 0
    for channel in (0, 1, 3, 4, 5):
        assert np.abs(codes[channel]).max() == 127  # each channel uses its full range
    error = np.abs(codes * scale[:, None, None, None] - weight)
    assert (error <= scale[:, None, None, None] / 2 + 1e-7).all()
    gemm_codes, gemm_scale = quantize_weight(weight.reshape(6, -1).T, axis=1)  # MatMul (K, N): columns
    np.testing.assert_array_equal(gemm_codes, codes.reshape(6, -1).T)
    np.testing.assert_array_equal(gemm_scale, scale)


def test_quantize_bias_at_product_scale():
    codes, scale = quantize_bias(np.array([0.5, -1.0], np.float32), 0.02, np.array([0.1, 0.01], np.float32))
    np.testing.assert_allclose(scale, [0.002, 0.0002], rtol=1e-6)
    np.testing.assert_array_equal(codes, [250, -5000])
    assert codes.dtype == np.int32


@pytest.mark.parametrize(("low", "high", "zero_point"), [(0.0, 6.0, 0), (-1.0, 1.0, 127), (-2.0, 0.0, 255), (0.5, 2.0, 0)])
def test_activation_quant_holds_zero(low, high, zero_point):
    quant = activation_quant(low, high)
    assert quant.zero_point == zero_point  # 0.0 is the code zero_point exactly
    assert quant.low <= min(low, 0.0) + quant.scale and quant.high >= max(high, 0.0) - quant.scale
    assert activation_quant(0.0, 0.0).scale == 1.0


def test_percentile_and_entropy_clip_outliers():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(200_000), [40.0, -35.0]]).astype(np.float32)
    histogram = Histogram(40.0)
    histogram.add(values)
    assert (histogram.low, histogram.high) == (-35.0, 40.0)
    low, high = percentile_range(histogram, 99.9)
    assert -3.6 < low < -2.9 and 2.9 < high < 3.6  # N(0,1): the 0.1% / 99.9% points are -+3.09
    low, high = entropy_range(histogram)
    assert -35.0 < low < -2.0 and 2.0 < high < 40.0 and high < 10.0  # the outliers are clipped
    uniform = np.ones(2048)
    assert entropy_threshold(uniform, 1.0) == 2048  # nothing to clip: the whole range


# --------------------------------------------------------------------------
# graphs
# --------------------------------------------------------------------------


def small_cnn(seed: int = 0) -> ir.Model:
    """conv -> relu -> depthwise conv -> relu -> 1x1 conv -> global pool -> flatten -> gemm -> matmul."""
    rng = np.random.default_rng(seed)
    init = {
        "w1": rng.standard_normal((8, 3, 3, 3)) * 0.3, "b1": rng.standard_normal(8) * 0.1,
        "w2": rng.standard_normal((8, 1, 3, 3)) * 0.3, "b2": rng.standard_normal(8) * 0.1,
        "w3": rng.standard_normal((16, 8, 1, 1)) * 0.3,
        "wg": rng.standard_normal((12, 16)) * 0.3, "bg": rng.standard_normal(12) * 0.1,
        "wm": rng.standard_normal((12, 5)) * 0.3,
    }  # fmt: skip
    init = {name: array.astype(np.float32) for name, array in init.items()}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="dwconv", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="pwconv"),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], name="fc", transB=1),
        helper.make_node("MatMul", ["g", "wm"], ["y"], name="head"),
    ]
    return make_onnx(nodes, {"x": [1, 3, 10, 10]}, {"y": [1, 5]}, init)


def samples(count: int = 32, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, 10, 10)).astype(np.float32) for _ in range(count)]


def copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def by_name(model: ir.Model) -> dict[str, ir.Node]:
    return {node.name: node for node in model.graph}


def dequantized_weight(node: ir.Node, index: int = 1) -> ir.Node | None:
    producer = node.inputs[index].producer()
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None


LAYERS = ("conv1", "dwconv", "pwconv", "fc", "head")


@pytest.mark.parametrize("method", METHODS)
def test_structure_qdq(method):
    model = small_cnn()
    float_bytes = {name: model.graph.initializers[name].const_value.nbytes for name in ("w2", "w3", "wg")}
    result = QuantizeInt8Pass(calibration=samples(), method=method)(model)
    assert result.modified
    nodes = by_name(result.model)
    for name in ("conv1", "head"):  # first and last: float by default
        assert dequantized_weight(nodes[name]) is None and nodes[name].inputs[1].const_value.dtype == ir.DataType.FLOAT
    expected_axis = {"dwconv": (0, 8), "pwconv": (0, 16), "fc": (0, 12)}
    for name, (axis, channels) in expected_axis.items():
        node = nodes[name]
        dq = dequantized_weight(node)
        assert dq is not None and dq.attributes.get_int("axis") == axis
        codes, scale, zero = (value.const_value for value in dq.inputs)
        assert codes.dtype == ir.DataType.INT8 and scale.shape == (channels,) and zero.dtype == ir.DataType.INT8
        assert not zero.numpy().any()
        data = node.inputs[0].producer()  # the activation arrives through Q -> DQ (uint8)
        assert data.op_type == "DequantizeLinear" and data.inputs[0].producer().op_type == "QuantizeLinear"
        assert data.inputs[2].const_value.dtype == ir.DataType.UINT8 and data.inputs[1].const_value.shape == ()
    for name, weight in (("dwconv", "w2"), ("pwconv", "w3"), ("fc", "wg")):
        codes = dequantized_weight(nodes[name]).inputs[0].const_value
        assert codes.nbytes * 4 == float_bytes[weight]  # int8 codes: 4x smaller than the float32 weight
    assert dequantized_weight(nodes["dwconv"], 2).inputs[0].const_value.dtype == ir.DataType.INT32  # int32 bias
    assert "w2" not in result.model.graph.initializers  # the float weights are gone
    # the ReLU is the conv's output: Q/DQ after relu1 and relu2, never between a conv and its ReLU
    assert nodes["relu2"].inputs[0].producer() is nodes["dwconv"]
    assert [use.node.op_type for use in nodes["relu2"].outputs[0].uses()] == ["QuantizeLinear"]
    relu_zero_point = nodes["relu2"].outputs[0].uses()[0].node.inputs[2].const_value.numpy()
    assert relu_zero_point == 0  # a ReLU output: zero point 0, the whole 0..255 for x >= 0
    assert [value.name for value in result.model.graph.outputs] == ["y"]
    assert [value.name for value in result.model.graph.inputs] == ["x"]


def test_keep_first_last_false_and_exclude():
    everything = QuantizeInt8Pass(calibration=samples(8), keep_first_last=False)(small_cnn()).model
    assert all(dequantized_weight(by_name(everything)[name]) is not None for name in LAYERS)
    excluded = QuantizeInt8Pass(calibration=samples(8), keep_first_last=False, exclude=("fc",))(small_cnn()).model
    nodes = by_name(excluded)
    assert dequantized_weight(nodes["fc"]) is None
    assert all(dequantized_weight(nodes[name]) is not None for name in LAYERS if name != "fc")


def test_nothing_to_quantize_is_not_modified(caplog):
    model = small_cnn()
    with caplog.at_level(logging.INFO, logger="edgec.passes"):
        result = QuantizeInt8Pass(calibration=samples(2), exclude=("dwconv", "pwconv", "fc"))(model)
    assert result.modified is False
    assert not any(node.op_type.endswith("QuantizeLinear") for node in result.model.graph)
    assert "excluded" in caplog.text and "the first layer" in caplog.text


def test_qdq_graph_is_not_quantized_again(caplog):
    once = QuantizeInt8Pass(calibration=samples(4))(small_cnn()).model
    again = QuantizeInt8Pass(calibration=samples(4), keep_first_last=False)(copy(once))
    counts = [sum(node.op_type == "DequantizeLinear" for node in graph.graph) for graph in (once, again.model)]
    assert counts[1] >= counts[0]
    assert all(dequantized_weight(by_name(again.model)[name]) is not None for name in ("dwconv", "pwconv", "fc"))
    nodes = by_name(again.model)
    inner = dequantized_weight(nodes["dwconv"]).inputs[0]
    assert inner.producer() is None  # int8 codes, not a DequantizeLinear of a DequantizeLinear


@pytest.mark.parametrize("method", METHODS)
def test_numerics_close_to_float(method):
    """ORT on the QDQ graph as written (the pass's numerics, not the CPU's integer kernels: ORT's
    fused u8s8 ones saturate without VNNI) against ORT on the float graph, on inputs not used for
    calibration: within 4 output quantization steps of the float output (255 steps over its range)."""
    model = small_cnn()
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((1, 3, 10, 10)).astype(np.float32) for _ in range(8)]
    want = np.concatenate([run_onnxruntime(model, [x])[0] for x in inputs])
    quantized = QuantizeInt8Pass(calibration=samples(64), method=method, keep_first_last=False)(copy(model)).model
    got = np.concatenate([run_onnxruntime(quantized, [x], optimize=False)[0] for x in inputs])
    step = (want.max() - want.min()) / 255
    error = np.abs(got - want).max()
    assert 0 < error < 4 * step, (method, error, step)


# --------------------------------------------------------------------------
# calibration inputs and errors
# --------------------------------------------------------------------------


def test_folder_npy_and_iterable_give_the_same_graph(tmp_path):
    data = np.concatenate(samples(6))
    folder = tmp_path / "calib"
    folder.mkdir()
    for index, sample in enumerate(data):
        np.save(folder / f"{index:03d}.npy", sample)  # no batch axis: one is added
    np.save(tmp_path / "batch.npy", data)  # (6, 3, 10, 10): split into the model's batch of 1
    graphs = [
        QuantizeInt8Pass(calibration=source)(small_cnn()).model
        for source in (str(folder), str(tmp_path / "batch.npy"), iter(list(data[:, None])), data)
    ]
    protos = [ir.serde.serialize_model(graph).SerializeToString() for graph in graphs]
    assert protos[0] == protos[1] == protos[2] == protos[3]


def test_without_calibration_says_what_to_give():
    with pytest.raises(ir.passes.PreconditionError, match=r"calibration=DIR .*calibration=FILE\.npy.*iterable"):
        QuantizeInt8Pass()(small_cnn())
    model = Model(small_cnn(), None, "onnx", None)
    with pytest.raises(PassError, match="quantize-int8.*needs calibration data"):
        edgec.apply(model, [parse("quantize-int8:method=entropy")], measure=False)


@pytest.mark.parametrize(
    ("passes", "refused", "words"),
    [
        (["binary:quantize=true", "quantize-int8"], "quantize-int8", "Binary.*not supported yet"),
        (["quantize-int8", "block-sparse:n=4,sparsity=0.5"], "block-sparse", "DequantizeLinear.*run quantize-int8 after"),
        (["quantize-int8", "binary"], "binary", "DequantizeLinear.*run quantize-int8 after"),
    ],
    ids=["binary-then-int8", "int8-then-block-sparse", "int8-then-binary"],
)
def test_int8_with_edgec_op_passes_is_refused_by_name(passes, refused, words):
    """What does not combine (README, int8): a PassError naming the pass and the node, never a traceback
    from ONNX Runtime or the reference evaluator; the graph before the refused pass is untouched."""
    model = Model(small_cnn(), None, "onnx", None)
    chosen = [parse(text) for text in passes]
    chosen = [QuantizeInt8Pass(calibration=samples(4)) if p.cli_name == "quantize-int8" else p for p in chosen]
    edgec.apply(model, chosen[:1], measure=False)
    before = ir.serde.serialize_model(model.graph).SerializeToString()
    with pytest.raises(PassError, match=rf"pass '{refused}' failed: .*{words}"):
        edgec.apply(model, chosen[1:], measure=False)
    assert ir.serde.serialize_model(model.graph).SerializeToString() == before


def test_block_sparse_layers_stay_float_in_the_graph_and_its_twin():
    """block-sparse then quantize-int8: the packed layers (edgec ops) and their masked twins
    (``pack=false``) stay float, every other layer is int8 in both; calibrated through the ops'
    NumPy references, since ONNX Runtime cannot run them."""
    model = Model(small_cnn(), None, "onnx", None)
    edgec.apply(model, [parse("block-sparse:n=4,sparsity=0.5,layers=pwconv"),
                        QuantizeInt8Pass(calibration=samples(8), keep_first_last=False)])  # fmt: skip
    graph, twin = model.graph, model.standard_graph
    assert twin is not None, model.standard_note
    packed = [node for node in graph.graph if node.domain == "edgec"]
    assert [node.op_type for node in packed] == ["BlockSparseConv"]
    masked = by_name(twin)["pwconv"]
    assert masked.metadata_props["edgec.block_sparse"] == "1x4" and dequantized_weight(masked) is None
    for name in ("conv1", "dwconv", "fc", "head"):
        assert dequantized_weight(by_name(graph)[name]) is not None, name
        assert dequantized_weight(by_name(twin)[name]) is not None, name
    # the block-sparse layer's output feeds an int8 layer: quantized by the same parameters in both
    def scales(g):
        return sorted(float(n.inputs[1].const_value.numpy()) for n in g.graph if n.op_type == "QuantizeLinear")

    assert scales(graph) == scales(twin)  # the twin is quantized with the graph's own ranges, not recalibrated
    x = samples(1, seed=7)
    from edgec.runtimes.reference import run_numpy_reference

    np.testing.assert_allclose(run_numpy_reference(graph, x)[0], run_onnxruntime(twin, x, optimize=False)[0], atol=1e-4)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_the_twin_takes_the_graphs_ranges(method, monkeypatch):
    """With a histogram method too, reference.onnx (the twin) is quantized by the very parameters
    of the build's graph: the twin is handed the ranges, not calibrated again on its own masked
    layers (where float rounding or a histogram bin could pick other ones)."""
    from edgec.passes import quantize_int8

    calibrated = []
    original = quantize_int8.activation_ranges
    monkeypatch.setattr(quantize_int8, "activation_ranges", lambda *a, **k: calibrated.append(a[0]) or original(*a, **k))
    model = Model(small_cnn(), None, "onnx", None)
    edgec.apply(model, [parse("block-sparse:n=4,sparsity=0.5,layers=pwconv"),
                        QuantizeInt8Pass(calibration=samples(8), method=method, keep_first_last=False)], measure=False)  # fmt: skip
    assert model.standard_graph is not None, model.standard_note
    assert calibrated == [model.graph]  # once, on the build's graph

    def parameters(g):
        return sorted((n.inputs[0].name, float(n.inputs[1].const_value.numpy()), int(n.inputs[2].const_value.numpy()))
                      for n in g.graph if n.op_type == "QuantizeLinear")  # fmt: skip

    assert parameters(model.graph) and parameters(model.graph) == parameters(model.standard_graph)


def test_calibrated_ranges_must_cover_every_tensor():
    from edgec.passes.calibration import CalibratedRanges

    with pytest.raises(PassError, match="no calibrated range for tensor"):
        edgec.apply(Model(small_cnn(), None, "onnx", None), [QuantizeInt8Pass(calibration=CalibratedRanges())], measure=False)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: str(tmp / "missing"), "neither a folder nor a .npy file"),
        (lambda tmp: str(tmp), "holds no .npy files"),
        (lambda tmp: [np.zeros((1, 3, 9, 9), np.float32)], r"shape \(1, 3, 9, 9\) does not fit input 'x' of shape 1x3x10x10"),
        (lambda tmp: [], "holds no sample"),
    ],
)
def test_bad_calibration_data(tmp_path, make, message):
    with pytest.raises(ir.passes.PreconditionError, match=message):
        QuantizeInt8Pass(calibration=make(tmp_path))(small_cnn())


def test_calibration_samples_split_batches():
    value = small_cnn().graph.inputs[0]
    feeds = calibration_samples(np.zeros((5, 3, 10, 10), np.float32), [value])
    assert len(feeds) == 5 and feeds[0][0].shape == (1, 3, 10, 10)


def test_registered_and_parsed(tmp_path):
    assert QuantizeInt8Pass in PASSES
    configured = parse(f"quantize-int8:calibration={tmp_path},method=entropy,exclude=fc+head,keep_first_last=false")
    assert configured == QuantizeInt8Pass(calibration=str(tmp_path), method="entropy", exclude=("fc", "head"), keep_first_last=False)
    with pytest.raises(PassError, match="choose one of minmax, percentile, entropy"):
        parse("quantize-int8:method=kl")
    with pytest.raises(ir.passes.PreconditionError, match="exclude='fcc'.*did you mean 'fc'"):
        QuantizeInt8Pass(calibration=samples(1), exclude=("fcc",))(small_cnn())


# --------------------------------------------------------------------------
# a real model: the digits CNN
# --------------------------------------------------------------------------


def _digits_cnn(torch, nn, functional):
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def _digits_train_images() -> np.ndarray:
    """The training split of conftest.train_digits (same seed and scaling): calibration data."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = ((digits.images / 16.0 - 0.3) / 0.4).astype(np.float32)[:, None]
    train_x, _, _, _ = train_test_split(images, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    return train_x


@pytest.fixture(scope="module")
def digits(train_digits):
    path, images, labels, logits = train_digits(_digits_cnn, "digits_int8", epochs=15, lr=3e-3)
    return path, images, labels, float(np.mean(logits.argmax(axis=1) == labels))


@pytest.mark.parametrize("method", METHODS)
def test_digits_int8_accuracy(digits, method):
    """int8 (every layer but the first and last) against float on the 450 test images, calibrated on
    450 training images. Measured while writing this test: float 98.89%, int8 98.89% with each
    of the three methods (the printed line); the issue's bound is 0.5 points."""
    path, images, labels, float_accuracy = digits
    model = edgec.load(path)
    calibration = _digits_train_images()[: len(images)]  # the model's batch is the test set's 450
    edgec.apply(model, [FoldBatchNormPass(), QuantizeInt8Pass(calibration=[calibration], method=method)], measure=False)
    assert sum(node.op_type == "QuantizeLinear" for node in model.graph.graph) >= 3
    logits = run_onnxruntime(model.graph, [images])[0]
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    print(f"digits {method}: float {float_accuracy:.4f}, int8 {accuracy:.4f}")
    assert accuracy >= float_accuracy - 0.005
