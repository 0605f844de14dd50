"""Tests for passes/fuse_filters.py (DCFF filter fusion) and passes/remove_zero_channels.py (exact removal).

Graphs are built op by op with onnx.helper (seeded weights, BatchNorm with
non-trivial statistics), so each variant pins one propagation rule; a tiny
MobileNetV2 exported by PyTorch is compiled; a CNN trained on scikit-learn's
digits measures accuracy. Numbers are compared with ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec
from edgec.passes import PASSES, FuseFiltersPass, RemoveZeroChannelsPass
from edgec.passes.fuse_filters import (
    filter_distances,
    fuse_filters,
    keep_count,
    kl_importance,
    select_filters,
    similarity_distribution,
    zero_filters,
)
from edgec.passes.registry import parse
from edgec.runtimes.reference import run_onnxruntime
from edgec.core.stats import model_stats

from channel_checks import ATOL, RTOL, check_valid, conv_channels, io_signature, sample, to_model

LOGGER = "edgec.passes"  # the passes and the channel analysis they share


# --------------------------------------------------------------------------
# A tiny graph builder: ONNX nodes named after their single output.
# --------------------------------------------------------------------------


class Net:
    """Build an ONNX CNN op by op; ``shapes[name]`` is (C, H, W) or (features,)."""

    def __init__(self, shape: tuple[int, ...] = (1, 3, 8, 8), seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.params: dict[str, np.ndarray] = {}
        self.input_shape = shape
        self.opset = 17
        self.shapes: dict[str, tuple[int, ...]] = {"x": shape[1:]}

    def param(self, name: str, array: np.ndarray) -> str:
        self.params[name] = np.asarray(array, dtype=np.float32)
        return name

    def node(self, op: str, inputs: list[str], name: str, shape: tuple[int, ...] | None = None, **attributes) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        self.shapes[name] = shape if shape is not None else self.shapes[inputs[0]]
        return name

    def conv(self, name: str, x: str, out: int, kernel: int = 3, group: int = 1, bias: bool = True, pad: bool = True) -> str:
        channels, height, width = self.shapes[x]
        fan_in = channels // group * kernel * kernel
        weight = self.rng.standard_normal((out, channels // group, kernel, kernel)) * math.sqrt(2.0 / fan_in)
        inputs = [x, self.param(f"{name}.weight", weight)]
        if bias:
            inputs.append(self.param(f"{name}.bias", self.rng.uniform(-0.2, 0.2, out)))
        padding = kernel // 2 if pad else 0
        size = (height + 2 * padding - kernel + 1, width + 2 * padding - kernel + 1)
        return self.node(
            "Conv", inputs, name, (out, *size), kernel_shape=[kernel, kernel], pads=[padding] * 4, group=group
        )

    def bn(self, name: str, x: str) -> str:
        channels = self.shapes[x][0]
        inputs = [
            x,
            self.param(f"{name}.scale", self.rng.uniform(0.5, 1.5, channels)),
            self.param(f"{name}.B", self.rng.uniform(-0.3, 0.3, channels)),
            self.param(f"{name}.mean", self.rng.normal(0.0, 0.2, channels)),
            self.param(f"{name}.var", self.rng.uniform(0.5, 1.5, channels)),
        ]
        return self.node("BatchNormalization", inputs, name, epsilon=1e-5)

    def gap_flatten(self, name: str, x: str) -> str:
        pooled = self.node("GlobalAveragePool", [x], f"{name}_pool", (self.shapes[x][0], 1, 1))
        return self.node("Flatten", [pooled], name, (self.shapes[x][0],), axis=1)

    def gemm(self, name: str, x: str, out: int = 10, trans_b: bool = True) -> str:
        features = math.prod(self.shapes[x])
        weight = self.rng.standard_normal((out, features) if trans_b else (features, out)) / math.sqrt(features)
        inputs = [x, self.param(f"{name}.weight", weight), self.param(f"{name}.bias", self.rng.uniform(-0.1, 0.1, out))]
        return self.node("Gemm", inputs, name, (out,), transB=int(trans_b))

    def proto(self, output: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "net",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(self.input_shape))],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
            [numpy_helper.from_array(array, name) for name, array in self.params.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=8)
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)


# --------------------------------------------------------------------------
# The graph variants: a builder, the channels fuse mode leaves at ratio 0.5,
# a zeroing of filters (in place on the parameter arrays), and the channels
# masked mode leaves after that zeroing.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    build: Callable[[Net], str]
    fused: dict[str, int]  # Conv -> output channels after fuse at ratio 0.5 (others unchanged)
    zero: Callable[[dict[str, np.ndarray]], None]
    masked: dict[str, int]  # Conv -> output channels after masked mode on the zeroed graph
    depthwise: dict[str, int] = dataclasses.field(default_factory=dict)  # depthwise Conv -> channels after fuse

    def proto(self, zeroed: bool = False) -> onnx.ModelProto:
        net = Net()
        output = self.build(net)
        if zeroed:
            self.zero(net.params)
        return net.proto(output)


def _zero(params: dict[str, np.ndarray], conv: str, channels: list[int], bias: bool = True) -> None:
    params[f"{conv}.weight"][channels] = 0.0
    if bias and f"{conv}.bias" in params:
        params[f"{conv}.bias"][channels] = 0.0


def _chain(net: Net) -> str:
    x = net.node("Relu", [net.conv("conv1", "x", 16)], "relu1")
    x = net.node("Relu", [net.conv("conv2", x, 16)], "relu2")
    x = net.node("Relu", [net.conv("conv3", x, 12)], "relu3")
    return net.gemm("fc", net.gap_flatten("flat", x))


def _chain_zero(params):
    _zero(params, "conv1", [1, 4])  # constant 0: removable before the padded conv2
    _zero(params, "conv3", [0, 5, 6], bias=False)  # constant relu(b): folds into the Gemm's bias


def _bn(net: Net) -> str:
    x = net.node("Relu", [net.bn("bn1", net.conv("conv1", "x", 16, bias=False))], "relu1")
    x = net.node("LeakyRelu", [net.bn("bn2", net.conv("conv2", x, 16, kernel=1, pad=False))], "lrelu2", alpha=0.1)
    x = net.node("Relu", [net.bn("bn3", net.conv("conv3", x, 8))], "relu3")
    return net.gemm("fc", net.gap_flatten("flat", x))


def _bn_zero(params):
    _zero(params, "conv1", [2, 3])  # BN makes a non-zero constant; conv2 is 1x1 unpadded: folds
    _zero(params, "conv2", [0])  # non-zero constant before the padded conv3: must stay


def _depthwise(net: Net) -> str:
    x = net.node("Clip", [net.bn("bn1", net.conv("expand", "x", 24, kernel=1, pad=False, bias=False)), "zero", "six"], "clip1")
    net.param("zero", np.array(0.0))
    net.param("six", np.array(6.0))
    x = net.node("HardSwish", [net.bn("bn2", net.conv("dw", x, 24, group=24, bias=False))], "hswish2")
    x = net.bn("bn3", net.conv("project", x, 8, kernel=1, pad=False, bias=False))
    return net.gemm("fc", net.gap_flatten("flat", x))


def _depthwise_zero(params):
    _zero(params, "expand", [0, 7, 9])
    params["bn1.B"][[0, 7, 9]] = -0.5  # BN(0) < 0: Clip gives 0, which the padded depthwise Conv keeps constant
    params["bn1.mean"][[0, 7, 9]] = 0.0
    _zero(params, "project", [3])  # its BN constant folds into the Gemm


def _concat(net: Net) -> str:
    left = net.node("Relu", [net.conv("conv1", "x", 8)], "relu1")
    right = net.node("Sigmoid", [net.conv("conv2", "x", 8)], "sigmoid2")
    shape = (16, *net.shapes[left][1:])
    joined = net.node("Concat", [left, right], "concat", shape, axis=1)
    x = net.node("Relu", [net.conv("conv3", joined, 8, kernel=1, pad=False)], "relu3")
    return net.gemm("fc", net.gap_flatten("flat", x))


def _concat_zero(params):
    _zero(params, "conv1", [1], bias=False)
    _zero(params, "conv2", [0, 3], bias=False)  # sigmoid(b): a constant that folds into the 1x1 conv3


def _reduce_gemm(net: Net) -> str:
    """conv -> ReduceMean(axes input, keepdims=0) -> Gemm(transB=0), as torch.export writes a global pool (opset 18)."""
    net.opset = 18
    x = net.node("Relu", [net.conv("conv1", "x", 16)], "relu1")
    x = net.node("Relu", [net.bn("bn2", net.conv("conv2", x, 12, bias=False))], "relu2")
    net.params["axes"] = np.array([2, 3], dtype=np.int64)
    pooled = net.node("ReduceMean", [x, "axes"], "mean", (12,), keepdims=0)
    return net.gemm("fc", pooled, trans_b=False)


def _reduce_gemm_zero(params):
    _zero(params, "conv2", [4, 11])


def _flatten_gemm(net: Net) -> str:
    """Flatten of a 4x4 map: each channel is a block of 16 Gemm columns."""
    x = net.node("Relu", [net.conv("conv1", "x", 8)], "relu1")
    x = net.node("MaxPool", [x], "pool", (8, 4, 4), kernel_shape=[2, 2], strides=[2, 2])
    x = net.node("Relu", [net.bn("bn2", net.conv("conv2", x, 16, bias=False))], "relu2")
    flat = net.node("Flatten", [x], "flat", (16 * 4 * 4,), axis=1)
    return net.gemm("fc", flat)


def _flatten_gemm_zero(params):
    _zero(params, "conv1", [6])  # relu(0) = 0 through MaxPool into the padded conv2
    _zero(params, "conv2", [3, 10])  # BN constants, folded block-wise into the Gemm


def _reshape_matmul(net: Net) -> str:
    """Reshape(1, 256) -> MatMul -> Add: the explicit shape constant must shrink too."""
    x = net.node("Relu", [net.conv("conv1", "x", 8)], "relu1")
    x = net.node("MaxPool", [x], "pool", (8, 4, 4), kernel_shape=[2, 2], strides=[2, 2])
    x = net.node("Relu", [net.conv("conv2", x, 16)], "relu2")
    net.params["target"] = np.array([1, 256], dtype=np.int64)
    flat = net.node("Reshape", [x, "target"], "flat", (256,))
    weight = net.param("fc.weight", net.rng.standard_normal((256, 10)) / 16.0)
    product = net.node("MatMul", [flat, weight], "matmul", (10,))
    return net.node("Add", [product, net.param("fc.bias", net.rng.uniform(-0.1, 0.1, 10))], "logits")


def _reshape_matmul_zero(params):
    _zero(params, "conv2", [1, 2])  # relu(0) = 0: a MatMul has no bias, only zeros are removable
    _zero(params, "conv2", [5], bias=False)  # relu(b) may be non-zero: stays (checked below)
    params["conv2.bias"][5] = 0.05  # make it non-zero on purpose


def _residual(net: Net) -> str:
    """relu(conv1) + bn(conv2(relu(conv1))): conv1 and conv2 are tied by the Add."""
    r1 = net.node("Relu", [net.conv("conv1", "x", 16)], "relu1")
    b2 = net.bn("bn2", net.conv("conv2", r1, 16, bias=False))
    x = net.node("Relu", [net.node("Add", [b2, r1], "add")], "relu_add")
    x = net.node("Relu", [net.conv("conv3", x, 8, kernel=1, pad=False)], "relu3")
    return net.gemm("fc", net.gap_flatten("flat", x))


def _residual_zero(params):
    _zero(params, "conv1", [2, 5, 7])  # relu(0) = 0 into the padded conv2
    _zero(params, "conv2", [2, 5])  # BN constant + 0 through the Add, folded into the 1x1 conv3
    # channel 7 is zero in conv1 only: its tied partner in conv2 is not, so it stays


VARIANTS = {
    "chain": Variant(_chain, {"conv1": 8, "conv2": 8, "conv3": 6}, _chain_zero, {"conv1": 14, "conv3": 9}),
    "conv_bn_relu_conv": Variant(_bn, {"conv1": 8, "conv2": 8, "conv3": 4}, _bn_zero, {"conv1": 14, "conv2": 16}),
    "depthwise": Variant(
        _depthwise, {"expand": 12, "dw": 12, "project": 4}, _depthwise_zero, {"expand": 21, "dw": 21, "project": 7}, {"dw": 12}
    ),
    "concat": Variant(_concat, {"conv1": 4, "conv2": 4, "conv3": 4}, _concat_zero, {"conv1": 7, "conv2": 6}),
    "reduce_gemm": Variant(_reduce_gemm, {"conv1": 8, "conv2": 6}, _reduce_gemm_zero, {"conv2": 10}),
    "flatten_gemm": Variant(_flatten_gemm, {"conv1": 4, "conv2": 8}, _flatten_gemm_zero, {"conv1": 7, "conv2": 14}),
    "reshape_matmul": Variant(_reshape_matmul, {"conv1": 4, "conv2": 8}, _reshape_matmul_zero, {"conv2": 14}),
    "residual": Variant(_residual, {"conv1": 8, "conv2": 8, "conv3": 4}, _residual_zero, {"conv1": 14, "conv2": 14}),
}


# --------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------


def test_distribution_rows_are_probabilities_with_the_self_term_largest():
    weight = np.random.default_rng(0).standard_normal((12, 4, 3, 3)).astype(np.float32)
    distribution = similarity_distribution(weight, temperature=0.7)
    assert distribution.shape == (12, 12)
    np.testing.assert_allclose(distribution.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(distribution > 0)
    assert np.all(np.argmax(distribution, axis=1) == np.arange(12))  # d_kk = 0 is the smallest distance
    # scale-free: distances are divided by their mean
    np.testing.assert_allclose(similarity_distribution(weight * 32.0, 0.7), distribution, rtol=1e-9)


def test_distances_match_a_direct_computation():
    weight = np.random.default_rng(1).standard_normal((5, 2, 3, 3))
    flat = weight.reshape(5, -1)
    direct = np.linalg.norm(flat[:, None, :] - flat[None, :, :], axis=2)
    np.testing.assert_allclose(filter_distances(weight), direct, atol=1e-9)


def test_distribution_follows_the_softmax_definition():
    weight = np.random.default_rng(2).standard_normal((6, 3, 1, 1))
    distances = filter_distances(weight)
    mean = distances[~np.eye(6, dtype=bool)].mean()
    logits = -distances / (mean * 0.5)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(similarity_distribution(weight, 0.5), expected, rtol=1e-12)


def test_fused_filter_of_identical_filters_is_that_filter():
    weight = np.repeat(np.random.default_rng(3).standard_normal((1, 4, 3, 3)), 5, axis=0).astype(np.float32)
    bias = np.full(5, 0.25, dtype=np.float32)
    distribution = similarity_distribution(weight)
    np.testing.assert_allclose(distribution, 0.2)  # all distances 0: uniform
    fused, fused_bias = fuse_filters(weight, distribution, np.array([1, 3]), bias)
    assert fused.dtype == np.float32 and fused.shape == (2, 4, 3, 3)
    np.testing.assert_allclose(fused, weight[:2], rtol=1e-6)
    np.testing.assert_allclose(fused_bias, 0.25, rtol=1e-6)


def test_fused_filter_is_the_distribution_weighted_sum():
    weight = np.random.default_rng(4).standard_normal((4, 2, 3, 3))
    distribution = similarity_distribution(weight, 2.0)
    fused, _ = fuse_filters(weight, distribution, np.array([2]))
    np.testing.assert_allclose(fused[0], sum(distribution[2, j] * weight[j] for j in range(4)), rtol=1e-12)
    # a one-hot distribution (t -> 0) is plain selection
    selected, _ = fuse_filters(weight, np.eye(4), np.array([0, 3]))
    np.testing.assert_array_equal(selected, weight[[0, 3]])


def test_importance_is_the_summed_kl_divergence():
    distribution = similarity_distribution(np.random.default_rng(5).standard_normal((5, 3, 3, 3)), 0.8)
    expected = [
        sum(np.sum(distribution[k] * np.log(distribution[k] / distribution[j])) for j in range(5)) for k in range(5)
    ]
    np.testing.assert_allclose(kl_importance(distribution), expected, rtol=1e-10)


def test_importance_ranks_an_isolated_filter_above_near_duplicates():
    rng = np.random.default_rng(6)
    base = rng.standard_normal((2, 3, 3))
    weight = np.stack(
        [
            base,
            base + 0.01 * rng.standard_normal((2, 3, 3)),
            base + 0.01 * rng.standard_normal((2, 3, 3)),
            base + 0.3 * rng.standard_normal((2, 3, 3)),
            -3.0 * base,  # far from everything: its distribution differs most from the others'
        ]
    )
    importance = kl_importance(similarity_distribution(weight, 0.5))
    assert np.argmax(importance) == 4
    assert importance[3] > max(importance[:3])  # the moderately different one comes next
    np.testing.assert_array_equal(select_filters(importance, 2), [3, 4])


def test_keep_count_and_selection_order():
    assert keep_count(16, 0.5) == 8
    assert keep_count(10, 0.25) == 8  # 7.5 rounds half up
    assert keep_count(16, 0.0) == 16
    assert keep_count(16, 0.95, min_channels=4) == 4
    assert keep_count(3, 0.9) == 1
    np.testing.assert_array_equal(select_filters(np.array([1.0, 5.0, 5.0, 0.0]), 2), [1, 2])


def test_zero_filters():
    weight = np.ones((4, 2, 3, 3), dtype=np.float32)
    weight[[1, 3]] = 0.0
    weight[3, 0, 0, 0] = 1e-30
    np.testing.assert_array_equal(zero_filters(weight), [False, True, False, False])


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


def test_registered_and_parsed_from_the_command_line():
    assert FuseFiltersPass in PASSES
    parsed = parse("fuse-filters:ratio=0.4,layer_ratios=conv1@0.25+conv2@0.5,exclude=fc+conv3,mode=masked,min_channels=4")
    assert parsed == FuseFiltersPass(
        ratio=0.4, layer_ratios={"conv1": 0.25, "conv2": 0.5}, exclude=("fc", "conv3"), mode="masked", min_channels=4
    )


def test_zero_channels_registered_and_mode_masked_maps_to_it_with_a_warning():
    """README's ``fuse-filters:mode=masked`` still works: it runs the zero-channels pass, warning."""
    assert RemoveZeroChannelsPass in PASSES
    assert parse("zero-channels:exclude=conv3,min_channels=4") == RemoveZeroChannelsPass(exclude=("conv3",), min_channels=4)
    variant = VARIANTS["chain"]
    old, new = to_model(variant.proto(zeroed=True)), to_model(variant.proto(zeroed=True))
    with pytest.warns(DeprecationWarning, match="zero-channels"):
        assert FuseFiltersPass(mode="masked", ratio=0.9)(old.graph).modified
    assert RemoveZeroChannelsPass()(new.graph).modified
    assert conv_channels(old) == conv_channels(new) == {**conv_channels(to_model(variant.proto())), **variant.masked}


@pytest.mark.parametrize(
    "options", [{"ratio": 1.0}, {"ratio": -0.1}, {"temperature": 0.0}, {"mode": "prune"}, {"min_channels": 0}]
)
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        FuseFiltersPass(**options)


# --------------------------------------------------------------------------
# Matching graphs: fuse mode shrinks them, masked mode is exact
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_fuse_mode_shrinks_channels_macs_and_bytes(name):
    variant = VARIANTS[name]
    model = to_model(variant.proto())
    check_valid(model)
    before_channels, before_io, before = conv_channels(model), io_signature(model), model_stats(model.graph)
    inputs = sample(model)
    reference = run_onnxruntime(model.graph, inputs)

    result = FuseFiltersPass(ratio=0.5)(model.graph)

    assert result.modified is True
    assert conv_channels(model) == {**before_channels, **variant.fused}
    for node in model.graph.graph:
        if node.name in variant.depthwise:
            assert node.attributes.get_int("group") == variant.depthwise[node.name]
            assert node.inputs[1].const_value.shape[0] == variant.depthwise[node.name]
    after = model_stats(model.graph)
    assert after.macs < before.macs
    assert after.params < before.params
    assert after.size_bytes < before.size_bytes
    assert io_signature(model) == before_io  # graph inputs/outputs keep names and shapes
    check_valid(model)
    outputs = run_onnxruntime(model.graph, inputs)
    assert [out.shape for out in outputs] == [ref.shape for ref in reference]
    assert np.all(np.isfinite(outputs[0]))


def test_fuse_mode_macs_of_the_chain_by_hand():
    """8x8 maps, 3x3 convs: MACs = 64 * C_out * C_in * 9 per conv, plus the Gemm's C * 10."""
    model = to_model(VARIANTS["chain"].proto())
    before = model_stats(model.graph).macs
    assert before == 64 * 9 * (16 * 3 + 16 * 16 + 12 * 16) + 12 * 10
    FuseFiltersPass(ratio=0.5)(model.graph)
    assert model_stats(model.graph).macs == 64 * 9 * (8 * 3 + 8 * 8 + 6 * 8) + 6 * 10
    fc = next(node for node in model.graph.graph if node.op_type == "Gemm")
    assert fc.inputs[1].const_value.shape == (10, 6)


@pytest.mark.parametrize("name", VARIANTS)
def test_masked_mode_is_exact(name):
    variant = VARIANTS[name]
    model = to_model(variant.proto(zeroed=True))
    before_channels, before_io, before = conv_channels(model), io_signature(model), model_stats(model.graph)
    inputs = sample(model)
    reference = run_onnxruntime(model.graph, inputs)

    result = RemoveZeroChannelsPass()(model.graph)

    assert result.modified is True
    assert conv_channels(model) == {**before_channels, **variant.masked}
    assert model_stats(model.graph).macs < before.macs
    assert model_stats(model.graph).size_bytes < before.size_bytes
    assert io_signature(model) == before_io
    check_valid(model)
    for got, want in zip(run_onnxruntime(model.graph, inputs), reference, strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_fuse_mode_at_a_tiny_temperature_is_selection():
    """t -> 0: each kept filter is its original, and the output equals the original graph with the
    removed channels' weights zeroed in the layers that read them (exact plumbing)."""
    proto = VARIANTS["conv_bn_relu_conv"].proto()
    model = to_model(proto)
    original = {name: value.const_value.numpy().copy() for name, value in model.graph.graph.initializers.items()}
    FuseFiltersPass(ratio=0.5, temperature=1e-3)(model.graph)
    weights = {node.name: node.inputs[1].const_value.numpy() for node in model.graph.graph if node.op_type in ("Conv", "Gemm")}
    kept, kept_in = {}, np.arange(3)
    for conv in ("conv1", "conv2", "conv3"):
        old = original[f"{conv}.weight"][:, kept_in]  # its input channels are the previous layer's kept ones
        kept[conv] = np.array([np.flatnonzero([np.array_equal(row, old_row) for old_row in old])[0] for row in weights[conv]])
        assert np.all(np.diff(kept[conv]) > 0), "kept channels keep their order"
        kept_in = kept[conv]
    zeroed = {name: array.copy() for name, array in original.items()}
    for conv, reader, axis in (("conv1", "conv2", 1), ("conv2", "conv3", 1), ("conv3", "fc", 1)):
        removed = np.setdiff1d(np.arange(original[f"{conv}.weight"].shape[0]), kept[conv])
        np.moveaxis(zeroed[f"{reader}.weight"], axis, 0)[removed] = 0.0
    for initializer in proto.graph.initializer:
        initializer.CopyFrom(numpy_helper.from_array(zeroed[initializer.name], initializer.name))
    inputs = sample(model)
    want = run_onnxruntime(to_model(proto).graph, inputs)
    np.testing.assert_allclose(run_onnxruntime(model.graph, inputs)[0], want[0], rtol=RTOL, atol=ATOL)


def test_tied_group_shares_one_keep_set_from_the_summed_importance():
    model = to_model(VARIANTS["residual"].proto())
    weights = {name: value.const_value.numpy() for name, value in model.graph.graph.initializers.items()}
    importance = sum(kl_importance(similarity_distribution(weights[f"{conv}.weight"], 0.5)) for conv in ("conv1", "conv2"))
    keep = select_filters(importance, 8)
    FuseFiltersPass(ratio=0.5, temperature=0.5)(model.graph)
    new = {node.name: node for node in model.graph.graph}
    for conv in ("conv1", "conv2"):
        expected, _ = fuse_filters(weights[f"{conv}.weight"], similarity_distribution(weights[f"{conv}.weight"], 0.5), keep)
        got = new[conv].inputs[1].const_value.numpy()
        # conv2 also reads conv1's (tied) channels: its input axis is sliced with the same keep-set
        np.testing.assert_allclose(got, expected[:, keep] if conv == "conv2" else expected, rtol=1e-6)
    np.testing.assert_array_equal(new["bn2"].inputs[1].const_value.numpy(), weights["bn2.scale"][keep])


def test_layer_ratios_and_min_channels():
    model = to_model(VARIANTS["chain"].proto())
    FuseFiltersPass(ratio=0.25, layer_ratios={"conv2": 0.75, "conv3": 0.0}, min_channels=6)(model.graph)
    assert conv_channels(model) == {"conv1": 12, "conv2": 6, "conv3": 12}


# --------------------------------------------------------------------------
# Graphs that must not change
# --------------------------------------------------------------------------


def _unchanged(model: edgec.Model, graph_pass: FuseFiltersPass) -> None:
    before = ir.serde.serialize_model(model.graph).SerializeToString()
    result = graph_pass(model.graph)
    assert result.modified is False
    assert ir.serde.serialize_model(model.graph).SerializeToString() == before


@pytest.mark.parametrize("name", ["chain", "residual", "depthwise"])
def test_ratio_zero_changes_nothing(name):
    _unchanged(to_model(VARIANTS[name].proto()), FuseFiltersPass(ratio=0.0))


def test_masked_mode_without_zero_filters_changes_nothing():
    _unchanged(to_model(VARIANTS["concat"].proto()), RemoveZeroChannelsPass())


def test_everything_excluded_changes_nothing_and_says_so(caplog):
    model = to_model(VARIANTS["chain"].proto())
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _unchanged(model, FuseFiltersPass(exclude=("conv1", "conv2", "conv3")))
    for conv in ("conv1", "conv2", "conv3"):
        assert f"Conv '{conv}' skipped: excluded" in caplog.text


def test_residual_tied_to_an_excluded_conv_is_skipped_with_the_reason(caplog):
    model = to_model(VARIANTS["residual"].proto())
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = FuseFiltersPass(ratio=0.5, exclude=("conv1",))(model.graph)
    assert result.modified is True  # conv3 still shrinks
    assert conv_channels(model) == {"conv1": 16, "conv2": 16, "conv3": 4}
    assert "Conv 'conv2' skipped: its output reaches a residual Add 'add' tied to Conv 'conv1'" in caplog.text
    assert "Conv 'conv1', which is excluded" in caplog.text
    check_valid(model)


def test_residual_tied_to_the_graph_input_is_skipped(caplog):
    net = Net(shape=(1, 8, 8, 8))
    x = net.node("Relu", [net.node("Add", [net.conv("conv1", "x", 8), "x"], "add")], "relu")
    model = to_model(net.proto(net.gemm("fc", net.gap_flatten("flat", x))))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _unchanged(model, FuseFiltersPass(ratio=0.5))
    assert "Conv 'conv1' skipped: its output reaches a residual Add 'add' tied to graph input 'x'" in caplog.text


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        ("output", "reach graph output 'relu2' (graph outputs keep their shape)"),
        ("transpose", "are read by Transpose 'transpose', which the pass does not follow"),
        ("grouped", "are read by grouped Conv 'grouped' (group=2)"),
    ],
)
def test_blocked_channels_are_skipped_with_the_reason(caplog, tail, reason):
    net = Net()
    x = net.node("Relu", [net.conv("conv1", "x", 8)], "relu1")
    x = net.node("Relu", [net.conv("conv2", x, 8)], "relu2")
    if tail == "transpose":
        x = net.node("Transpose", [x], "transpose", (8, 8, 8), perm=[0, 1, 3, 2])
    elif tail == "grouped":
        x = net.conv("grouped", x, 8, group=2)
    model = to_model(net.proto(x))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = FuseFiltersPass(ratio=0.5)(model.graph)
    assert f"Conv 'conv2' skipped: its output channels {reason}" in caplog.text
    assert result.modified is True  # conv1 -> conv2 is free to shrink
    assert conv_channels(model)["conv1"] == 4
    assert conv_channels(model)["conv2"] == 8
    check_valid(model)
