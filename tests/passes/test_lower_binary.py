"""Tests of passes/lower_binary.py (``LowerBinaryPass``, ``-p binary``).

Numeric equivalence: the lowered graph in the NumPy reference (edgec's ops
in onnx's ReferenceEvaluator) against the original float graph in ONNX
Runtime, on seeded inputs, within rtol 1e-5 and atol 1e-5 x max|before|.
Exact detection changes nothing but summation order. Real model: a small
BNN trained here with a straight-through estimator on scikit-learn's digits;
its PyTorch accuracy equals the compiled accuracy.
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import edgec
from edgec.core.errors import PassError
from edgec.ops import DOMAIN
from edgec.ops.binary.format import unpack_bits
from edgec.passes import PASSES, FoldBatchNormPass, LowerBinaryPass
from edgec.passes.lower_binary import CodedWeight, binary_codes, conv_bits, quantize_binary
from edgec.passes.registry import parse
from edgec.runtimes.reference import run_numpy_reference, run_onnxruntime

from backbone import make_onnx  # noqa: E402 - tests/ on sys.path (conftest.py)

LOGGER = "edgec.passes"  # the pass and the coded-weight driver it shares with ternary
RTOL = 1e-5


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def sign_weight(rng, *shape, per_tensor: bool = False) -> np.ndarray:
    """+-a_o per output channel (axis 0), a_o in [0.05, 0.5)."""
    codes = np.where(rng.standard_normal(shape) < 0, -1.0, 1.0)
    scale = np.full(shape[0], 0.2) if per_tensor else rng.uniform(0.05, 0.5, shape[0])
    return (codes * scale.reshape(-1, *([1] * (len(shape) - 1)))).astype(np.float32)


def magnitude_weight(rng, *shape) -> np.ndarray:
    """0 or a_o per output channel (a_o of either sign)."""
    codes = (rng.random(shape) < 0.5).astype(np.float64)
    scale = rng.uniform(0.05, 0.5, shape[0]) * rng.choice([-1.0, 1.0], shape[0])
    return (codes * scale.reshape(-1, *([1] * (len(shape) - 1)))).astype(np.float32)


def feeds_for(model: ir.Model, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for value in model.graph.inputs:
        array = rng.standard_normal(tuple(int(dim) for dim in value.shape)).astype(np.float32)
        array[np.abs(array) < 0.2] = 0.0  # exact zeros: Sign(0) = 0
        arrays.append(array)
    return arrays


def assert_close(after: list[np.ndarray], before: list[np.ndarray]) -> None:
    assert len(after) == len(before)
    for got, want in zip(after, before, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * max(float(np.abs(want).max()), 1e-30))


def ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type if node.domain == "" else f"{node.domain}.{node.op_type}" for node in model.graph)


def signature(model: ir.Model) -> tuple:
    return (
        [(value.name, str(value.shape), value.dtype) for value in model.graph.inputs],
        [(value.name, str(value.shape), value.dtype) for value in model.graph.outputs],
    )


def edgec_nodes(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if node.domain == DOMAIN]


def messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name.startswith(LOGGER)]


def skip_messages(caplog) -> list[str]:
    return [message for message in messages(caplog) if "not lowered" in message]


def lower_and_check(model: ir.Model, graph_pass, caplog) -> tuple[ir.Model, ir.Node]:
    """Run ``graph_pass`` on a valid ``model`` that it must lower to one edgec node: the graph
    stays valid with the same inputs and outputs (names, shapes, dtypes), the NumPy reference
    of the result matches ONNX Runtime on the original, and no layer is skipped."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    feeds = feeds_for(model)
    before = run_onnxruntime(model, feeds)
    interface = signature(model)
    result = graph_pass(model)
    assert result.modified is True
    (node,) = edgec_nodes(result.model)
    assert signature(result.model) == interface
    onnx.checker.check_model(ir.serde.serialize_model(result.model))
    assert_close(run_numpy_reference(result.model, feeds), before)
    assert skip_messages(caplog) == []
    return result.model, node


# --------------------------------------------------------------------------
# the math (pure NumPy)
# --------------------------------------------------------------------------


def test_binary_codes_sign_recovers_codes_and_scales():
    rng = np.random.default_rng(0)
    weight = sign_weight(rng, 6, 3, 2, 2)
    coded = binary_codes(weight, "sign")
    np.testing.assert_array_equal(coded.codes, np.where(weight < 0, -1, 1))
    np.testing.assert_array_equal(coded.scale, np.abs(weight).reshape(6, -1).max(axis=1))
    np.testing.assert_array_equal(coded.dequantize(), weight)  # exact


def test_binary_codes_magnitude_and_all_zero_channel():
    rng = np.random.default_rng(1)
    weight = magnitude_weight(rng, 4, 5)
    weight[2] = 0.0
    coded = binary_codes(weight, "magnitude")
    assert set(np.unique(coded.codes)) <= {0, 1} and coded.scale[2] == 0.0
    np.testing.assert_array_equal(coded.dequantize(), weight)
    zero = binary_codes(np.zeros((2, 3), np.float32), "sign")  # a = 0, codes +1
    assert (zero.scale == 0).all() and (zero.codes == 1).all()


@pytest.mark.parametrize(
    ("weight", "encoding", "per_tensor", "reason"),
    [
        (np.array([[0.5, -0.5, 0.25]], np.float32), "sign", False, "channel 0 takes the values -0.5, 0.25, 0.5, not"),
        (np.array([[0.5, 0.0, -0.5]], np.float32), "sign", False, "not +-a"),  # ternary
        (np.array([[0.5, 0.0, -0.5]], np.float32), "magnitude", False, "not 0 and one a"),
        (np.array([[0.5, -0.5], [0.25, 0.25]], np.float32), "sign", True, "2 different scales"),
    ],
)
def test_binary_codes_refuses_with_reason(weight, encoding, per_tensor, reason):
    with pytest.raises(ValueError, match=reason.replace("+", r"\+")):
        binary_codes(weight, encoding, per_tensor)


def test_quantize_sign_is_xnor_net():
    weight = np.array([[0.3, -0.1, 0.0, -0.6], [1.0, 2.0, -3.0, 2.0]], np.float32)
    coded = quantize_binary(weight, "sign")
    np.testing.assert_array_equal(coded.codes, [[1, -1, 1, -1], [1, 1, -1, 1]])  # 0 -> +1
    np.testing.assert_allclose(coded.scale, [0.25, 2.0])  # mean |W|: the least-squares a for these codes
    per_tensor = quantize_binary(weight, "sign", per_tensor=True)
    np.testing.assert_allclose(per_tensor.scale, [1.125, 1.125])


def test_quantize_magnitude_maximises_the_cosine():
    """SiMaN: u = 1 on the k largest W (k maximising sum_topk / sqrt(k)), a = their mean; brute force check."""
    rng = np.random.default_rng(2)
    weight = rng.laplace(size=(5, 9)).astype(np.float32)
    coded = quantize_binary(weight, "magnitude")
    for row, codes, scale in zip(weight.astype(np.float64), coded.codes, coded.scale, strict=True):
        best = max(
            (np.sort(row)[::-1][:k].sum() / np.sqrt(k), k) for k in range(1, row.size + 1)
        )
        assert codes.sum() == best[1]
        assert np.all(row[codes == 1].min() >= row[codes == 0].max(initial=-np.inf))  # the largest ones
        np.testing.assert_allclose(scale, row[codes == 1].mean())


def test_conv_bits_layout_is_channel_last_packed():
    bits = np.zeros((2, 10, 3, 3), np.uint8)
    bits[1, 9, 2, 0] = 1
    packed = conv_bits(bits)
    assert packed.shape == (2, 3, 3, 2) and packed.dtype == np.uint8
    assert packed[1, 2, 0, 1] == 0b10 and packed.sum() == 2
    np.testing.assert_array_equal(unpack_bits(packed, 10), np.moveaxis(bits, 1, -1))


def test_dequantize_uses_float32_products():
    coded = CodedWeight(np.array([[1, -1]], np.int8), np.array([0.1]))
    assert coded.dequantize().dtype == np.float32
    assert coded.dequantize()[0, 0] == np.float32(0.1)


# --------------------------------------------------------------------------
# graphs that match
# --------------------------------------------------------------------------


def conv_case(
    rng, weight, *, activation: str | None = None, group: int = 1, relu: bool = False, pads=(1, 1, 1, 1), batchnorm: bool = False
):
    """x (1, C, 8, 8) -> [binarisation] -> Conv(W, b) -> [BatchNormalization] -> [Relu] -> y."""
    out, per_group = weight.shape[:2]
    channels = per_group * group
    nodes, data = [], "x"
    initializers = {"w": weight, "b": rng.standard_normal(out).astype(np.float32)}
    if activation == "sign":
        nodes.append(helper.make_node("Sign", ["x"], ["x_bin"], name="sign"))
        data = "x_bin"
    elif activation == "where":
        initializers.update(zero=np.float32(0.0), one=np.float32(1.0), minus_one=np.float32(-1.0))
        nodes.append(helper.make_node("GreaterOrEqual", ["x", "zero"], ["x_ge0"], name="ge0"))
        nodes.append(helper.make_node("Where", ["x_ge0", "one", "minus_one"], ["x_bin"], name="where"))
        data = "x_bin"
    conv_out = "c" if relu or batchnorm else "y"
    nodes.append(helper.make_node("Conv", [data, "w", "b"], [conv_out], name="conv", pads=list(pads), group=group))
    if batchnorm:
        initializers.update(
            gamma=(rng.uniform(0.5, 1.5, out) * rng.choice([-1.0, 1.0], out)).astype(np.float32),
            beta=rng.standard_normal(out).astype(np.float32),
            mean=rng.standard_normal(out).astype(np.float32),
            var=rng.uniform(0.2, 2.0, out).astype(np.float32),
        )
        bn_out = "n" if relu else "y"
        nodes.append(helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], [bn_out], name="bn", epsilon=1e-3))
    if relu:
        nodes.append(helper.make_node("Relu", ["n" if batchnorm else "c"], ["y"], name="relu"))
    size = 8 + pads[0] + pads[2] - weight.shape[2] + 1
    return make_onnx(nodes, {"x": [1, channels, 8, 8]}, {"y": [1, out, size, size]}, initializers)


def in_graph_binarised(rng, spelling: str) -> ir.Model:
    """W_b = sign(W) * mean|W| computed by a constant subgraph (what the dynamo exporter leaves)."""
    latent = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    initializers = {"latent": latent, "b": np.zeros(8, np.float32)}
    nodes = [
        helper.make_node("Abs", ["latent"], ["magnitude"]),
        helper.make_node("ReduceMean", ["magnitude"], ["scale"], axes=[1, 2, 3], keepdims=1),
    ]
    if spelling == "sign":
        nodes.append(helper.make_node("Sign", ["latent"], ["codes"]))
    else:
        initializers.update(zero=np.float32(0.0), one=np.float32(1.0), minus_one=np.float32(-1.0))
        nodes.append(helper.make_node("GreaterOrEqual", ["latent", "zero"], ["nonnegative"]))
        nodes.append(helper.make_node("Where", ["nonnegative", "one", "minus_one"], ["codes"]))
    nodes.append(helper.make_node("Mul", ["codes", "scale"], ["w"]))
    nodes.append(helper.make_node("Sign", ["x"], ["x_bin"], name="sign"))
    nodes.append(helper.make_node("Conv", ["x_bin", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]))
    return make_onnx(nodes, {"x": [2, 16, 6, 6]}, {"y": [2, 8, 6, 6]}, initializers)


def gemm_case(rng, *, through_flatten: bool) -> ir.Model:
    rows = sign_weight(rng, 10, 48)  # (N, K): transB=1
    nodes = []
    data = "x"
    if through_flatten:
        nodes += [
            helper.make_node("Sign", ["x"], ["x_bin"], name="sign"),
            helper.make_node("Flatten", ["x_bin"], ["flat"], name="flatten"),
        ]
        data = "flat"
    nodes.append(helper.make_node("Gemm", [data, "w", "c"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0))
    shape = [3, 3, 4, 4] if through_flatten else [3, 48]
    initializers = {"w": rows, "c": rng.standard_normal(10).astype(np.float32)}
    return make_onnx(nodes, {"x": shape}, {"y": [3, 10]}, initializers)


def matmul_case(rng) -> ir.Model:
    weight = sign_weight(rng, 12, 24).T.copy()  # (K, N), binary per column
    nodes = [
        helper.make_node("Sign", ["x"], ["x_bin"], name="sign"),
        helper.make_node("MatMul", ["x_bin", "w"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "bias"], ["y"], name="bias_add"),
    ]
    return make_onnx(nodes, {"x": [4, 24]}, {"y": [4, 12]}, {"w": weight, "bias": rng.standard_normal(12).astype(np.float32)})


# name -> (builder(rng) -> model, pass, expected edgec op, binarize_input, ops that must be gone)
MATCHES = {
    "sign_weights": (lambda rng: conv_case(rng, sign_weight(rng, 16, 24, 3, 3)), LowerBinaryPass(), "BinaryConv", "none", ["Conv"]),
    "magnitude_weights": (
        lambda rng: conv_case(rng, magnitude_weight(rng, 16, 24, 3, 3)),
        LowerBinaryPass(encoding="magnitude"), "BinaryConv", "none", ["Conv"],
    ),
    "per_tensor": (
        lambda rng: conv_case(rng, sign_weight(rng, 8, 16, 3, 3, per_tensor=True)),
        LowerBinaryPass(scale="per-tensor"), "BinaryConv", "none", ["Conv"],
    ),
    "sign_activation": (
        lambda rng: conv_case(rng, sign_weight(rng, 16, 24, 3, 3), activation="sign"),
        LowerBinaryPass(), "BinaryConv", "sign", ["Conv", "Sign"],
    ),
    "where_activation": (
        lambda rng: conv_case(rng, magnitude_weight(rng, 8, 16, 3, 3), activation="where"),
        LowerBinaryPass(encoding="magnitude"), "BinaryConv", "sign_ge0", ["Conv", "Where", "GreaterOrEqual"],
    ),
    "relu_fused": (
        lambda rng: conv_case(rng, sign_weight(rng, 8, 16, 3, 3), activation="sign", relu=True),
        LowerBinaryPass(), "BinaryConv", "sign", ["Conv", "Sign", "Relu"],
    ),
    "batchnorm_and_relu_fused": (
        lambda rng: conv_case(rng, sign_weight(rng, 8, 16, 3, 3), activation="sign", batchnorm=True, relu=True),
        LowerBinaryPass(), "BinaryConv", "sign", ["Conv", "Sign", "BatchNormalization", "Relu"],
    ),
    "sign_mean_in_graph": (lambda rng: in_graph_binarised(rng, "sign"), LowerBinaryPass(), "BinaryConv", "sign", ["Conv", "Abs", "ReduceMean", "Mul"]),
    "where_mean_in_graph": (lambda rng: in_graph_binarised(rng, "where"), LowerBinaryPass(), "BinaryConv", "sign", ["Conv", "Where", "Mul"]),
    "grouped_weight_only": (
        lambda rng: conv_case(rng, sign_weight(rng, 8, 8, 3, 3), activation="sign", group=2),
        LowerBinaryPass(), "BinaryConv", "none", ["Conv"],
    ),
    "gemm_through_flatten": (lambda rng: gemm_case(rng, through_flatten=True), LowerBinaryPass(), "BinaryGemm", "sign", ["Gemm"]),
    "gemm_float_input": (lambda rng: gemm_case(rng, through_flatten=False), LowerBinaryPass(), "BinaryGemm", "none", ["Gemm"]),
    "matmul_add": (matmul_case, LowerBinaryPass(), "BinaryGemm", "sign", ["MatMul", "Add", "Sign"]),
}  # fmt: skip


@pytest.mark.parametrize("case", MATCHES)
def test_lowers(case, caplog):
    build, graph_pass, op_type, mode, gone = MATCHES[case]
    model, node = lower_and_check(build(np.random.default_rng(7)), graph_pass, caplog)
    assert node.op_type == op_type
    assert node.attributes.get_string("binarize_input") == mode
    counts = ops(model)
    for op in gone:
        assert counts[op] == 0, f"{op} left: {counts}"
    assert model.opset_imports[DOMAIN] == 1
    assert any("weights" in message and "->" in message for message in messages(caplog))


def test_relu_is_fused_into_the_epilogue():
    model = MATCHES["relu_fused"][0](np.random.default_rng(3))
    LowerBinaryPass()(model)
    (node,) = edgec_nodes(model)
    assert node.attributes.get_string("activation") == "Relu"
    assert node.outputs[0].name == "y"


def test_weights_shrink_32x_up_to_the_scales():
    rng = np.random.default_rng(4)
    model = conv_case(rng, sign_weight(rng, 64, 64, 3, 3), activation="sign")
    LowerBinaryPass()(model)
    (node,) = edgec_nodes(model)
    bits = node.inputs[1].const_value.numpy()
    scale = node.inputs[2].const_value.numpy()
    assert bits.dtype == np.uint8 and bits.shape == (64, 3, 3, 8)
    assert 64 * 64 * 9 * 4 == 32 * bits.nbytes  # exactly 1 bit per weight
    assert scale.nbytes == 4 * 64
    assert "w" not in model.graph.initializers  # the float weight is gone


def test_macs_are_those_of_the_float_layer():
    from edgec.core.stats import model_stats

    rng = np.random.default_rng(4)
    model = conv_case(rng, sign_weight(rng, 64, 64, 3, 3), activation="sign")
    before = model_stats(model).macs
    LowerBinaryPass()(model)
    assert before > 0 and model_stats(model).macs == before


def test_shared_sign_stays_for_its_other_consumers():
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Sign", ["x"], ["x_bin"], name="sign"),
        helper.make_node("Conv", ["x_bin", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceSum", ["x_bin"], ["s"], name="sum", keepdims=0),
    ]
    model = make_onnx(nodes, {"x": [1, 8, 5, 5]}, {"y": [1, 4, 5, 5], "s": []}, {"w": sign_weight(rng, 4, 8, 3, 3)})
    feeds = feeds_for(model)
    before = run_onnxruntime(model, feeds)
    assert LowerBinaryPass()(model).modified
    (node,) = edgec_nodes(model)
    assert ops(model)["Sign"] == 1 and node.inputs[0].name == "x_bin"  # reads Sign's output: b(b(x)) = b(x)
    assert node.attributes.get_string("binarize_input") == "sign"
    assert_close(run_numpy_reference(model, feeds), before)


def test_fold_bn_first_keeps_weights_binary():
    """BN folded into the Conv scales each channel: still +-a per channel, lowered exactly."""
    rng = np.random.default_rng(6)
    channels = 8
    bn = {
        "gamma": rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels),
        "beta": rng.standard_normal(channels), "mean": rng.standard_normal(channels), "var": rng.uniform(0.2, 2, channels),
    }  # fmt: skip
    nodes = [
        helper.make_node("Sign", ["x"], ["x_bin"]),
        helper.make_node("Conv", ["x_bin", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
    ]
    initializers = {"w": sign_weight(rng, channels, 16, 3, 3), **{key: value.astype(np.float32) for key, value in bn.items()}}
    model = make_onnx(nodes, {"x": [1, 16, 6, 6]}, {"y": [1, channels, 6, 6]}, initializers)
    feeds = feeds_for(model)
    before = run_onnxruntime(model, feeds)
    assert FoldBatchNormPass()(model).modified
    assert LowerBinaryPass()(model).modified
    assert set(ops(model)) == {"edgec.BinaryConv"}
    assert_close(run_numpy_reference(model, feeds), before)


# --------------------------------------------------------------------------
# graphs that must not match
# --------------------------------------------------------------------------


def _float_conv(rng):
    return conv_case(rng, rng.standard_normal((8, 16, 3, 3)).astype(np.float32), activation="sign")


def _weight_input(rng):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    return make_onnx(nodes, {"x": [1, 4, 5, 5], "w": [2, 4, 3, 3]}, {"y": [1, 2, 3, 3]}, {})


def _conv1d(rng):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    return make_onnx(nodes, {"x": [1, 4, 9]}, {"y": [1, 6, 7]}, {"w": sign_weight(rng, 6, 4, 3)})


NON_MATCHES = {
    "float_weights": (_float_conv, LowerBinaryPass(), "is not binary (sign, per-channel)"),
    "ternary_under_sign": (
        lambda rng: conv_case(rng, (sign_weight(rng, 8, 16, 3, 3) * (rng.random((8, 16, 3, 3)) > 0.3)).astype(np.float32)),
        LowerBinaryPass(), "not +-a",
    ),
    "magnitude_under_sign": (lambda rng: conv_case(rng, magnitude_weight(rng, 8, 16, 3, 3)), LowerBinaryPass(), "not +-a"),
    "per_tensor_differs": (lambda rng: conv_case(rng, sign_weight(rng, 8, 16, 3, 3)), LowerBinaryPass(scale="per-tensor"), "different scales"),
    "weight_is_input": (_weight_input, LowerBinaryPass(), "is not a constant"),
    "conv1d": (_conv1d, LowerBinaryPass(), "1-D convolution"),
    "excluded": (lambda rng: conv_case(rng, sign_weight(rng, 8, 16, 3, 3)), LowerBinaryPass(exclude=("conv",)), "excluded"),
}  # fmt: skip


@pytest.mark.parametrize("case", NON_MATCHES)
def test_does_not_lower(case, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    build, graph_pass, reason = NON_MATCHES[case]
    model = build(np.random.default_rng(8))
    serialized = ir.serde.serialize_model(model).SerializeToString()
    result = graph_pass(model)
    assert result.modified is False
    assert ir.serde.serialize_model(result.model).SerializeToString() == serialized  # untouched
    (message,) = skip_messages(caplog)
    assert "'conv'" in message and reason in message
    if case == "float_weights":
        assert "quantize=true" in message


# --------------------------------------------------------------------------
# quantisation (lossy, reported)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["sign", "magnitude"])
def test_quantize_lowers_float_weights_and_reports_the_error(encoding, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = edgec.from_onnx_ir(_float_conv(np.random.default_rng(9)))
    (report,) = edgec.apply(model, [LowerBinaryPass(encoding=encoding, quantize=True)])
    assert report.modified and report.max_abs_deviation > 0  # lossy, and measured
    assert report.size_after < report.size_before / 10
    (node,) = edgec_nodes(model.graph)
    assert node.attributes.get_string("encoding") == encoding
    assert any("quantised: weight error" in message for message in messages(caplog))


# --------------------------------------------------------------------------
# registry and CLI
# --------------------------------------------------------------------------


def test_registered_and_parsed_from_the_command_line():
    assert LowerBinaryPass in PASSES
    configured = parse("binary:encoding=magnitude,scale=per-tensor,quantize=true,exclude=conv1+fc")
    assert configured == LowerBinaryPass(encoding="magnitude", scale="per-tensor", quantize=True, exclude=("conv1", "fc"))
    with pytest.raises(PassError, match="choose one of sign, magnitude"):
        parse("binary:encoding=xnor")


# --------------------------------------------------------------------------
# a real BNN: trained with a straight-through estimator on scikit-learn's digits
# --------------------------------------------------------------------------


def _digits_bnn(torch, nn, functional):
    class SignSTE(torch.autograd.Function):
        """Sign forward; gradient passed where |x| <= 1 (the straight-through estimator)."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.sign(x)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * (x.abs() <= 1).to(grad.dtype)

    def binarised(weight, dims, training):
        """sign(W) * mean|W| per output channel; STE to the latent weight while training."""
        binary = torch.where(weight >= 0, 1.0, -1.0) * weight.abs().mean(dim=dims, keepdim=True)
        return weight + (binary - weight).detach() if training else binary

    class BinaryConv2d(nn.Conv2d):
        def forward(self, x):
            return functional.conv2d(x, binarised(self.weight, (1, 2, 3), self.training), None, self.stride, self.padding)

    class BinaryLinear(nn.Linear):
        def forward(self, x):
            return functional.linear(x, binarised(self.weight, (1,), self.training))

    class BNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = BinaryConv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
            self.conv2, self.bn2 = BinaryConv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
            self.conv3, self.bn3 = BinaryConv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
            self.fc1, self.bn4 = BinaryLinear(256, 64, bias=False), nn.BatchNorm1d(64)
            self.fc2 = nn.Linear(64, 10)  # the classifier stays float, as in most BNNs

        def sign(self, x):
            return SignSTE.apply(x) if self.training else torch.sign(x)

        def forward(self, x):
            x = self.sign(self.bn1(self.conv1(x)))  # conv1: binary weights, float pixels (weight-only)
            x = self.sign(functional.max_pool2d(self.bn2(self.conv2(x)), 2))
            x = self.sign(functional.max_pool2d(self.bn3(self.conv3(x)), 2))
            x = self.sign(self.bn4(self.fc1(torch.flatten(x, 1))))
            return self.fc2(x)

    return BNN()


@pytest.fixture(scope="module")
def digits_bnn(train_digits):
    """(ONNX path, test images, test labels, PyTorch test logits) of a BNN trained here."""
    return train_digits(_digits_bnn, "digits_bnn", epochs=20, lr=1e-2, cosine=True)


@pytest.mark.parametrize("fold_bn_first", [True, False], ids=["fold-bn+binary", "binary"])
def test_digits_bnn_compiled_accuracy_equals_pytorch(digits_bnn, tmp_path, caplog, fold_bn_first):
    """With or without fold-bn first: the batch norms end up in the binary ops' epilogues."""
    from edgec.runtimes.local import LocalRunner

    caplog.set_level(logging.INFO, logger=LOGGER)
    path, images, labels, torch_logits = digits_bnn
    torch_accuracy = float(np.mean(torch_logits.argmax(axis=1) == labels))
    model = edgec.load(path)
    edgec.apply(model, [FoldBatchNormPass(), LowerBinaryPass()] if fold_bn_first else [LowerBinaryPass()])
    assert ops(model.graph)["BatchNormalization"] == 0
    modes = collections.Counter(
        (node.op_type, node.attributes.get_string("binarize_input")) for node in edgec_nodes(model.graph)
    )
    # conv1 reads pixels (weight-only); conv2, conv3 and fc1 read Sign: xnor/popcount
    assert modes == {("BinaryConv", "none"): 1, ("BinaryConv", "sign"): 2, ("BinaryGemm", "sign"): 1}
    assert ops(model.graph)["Sign"] == 2  # behind Flatten, and before the float classifier; two absorbed
    result = edgec.compile(model, "x86", tmp_path / "bnn")
    assert result.manifest["verification"]["status"] == "passed"
    logits = LocalRunner(result.artifact).run([images])[0]
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    print(f"\ndigits BNN: PyTorch accuracy {torch_accuracy:.4f}, compiled (binary kernels) {accuracy:.4f}")
    assert torch_accuracy > 0.85  # it learned something: the comparison means something
    assert accuracy == torch_accuracy
    assert np.mean(logits.argmax(axis=1) == torch_logits.argmax(axis=1)) == 1.0
    np.testing.assert_allclose(logits, torch_logits, rtol=1e-4, atol=1e-4 * float(np.abs(torch_logits).max()))
    report = model.pass_reports[-1]
    assert report.size_after < report.size_before / 5
