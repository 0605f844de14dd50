"""Tests of passes/fold_batchnorm.py (``FoldBatchNormPass``, ``-p fold-bn``).

Numeric equivalence: ONNX Runtime (graph optimisations off, so that the
"before" graph really runs its BatchNormalization) on seeded random inputs,
before vs after the pass, within rtol=1e-5 and atol=1e-5 * max|before|
(the error relative to the output's scale, as ``edgec.apply`` reports it).
Batch-norm statistics are non-trivial: gamma of both signs, beta, mean,
var in [0.2, 3], epsilon 1e-3.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec
from edgec.apply_passes import apply as apply_passes
from edgec.core.errors import PassError
from edgec.passes import PASSES, FoldBatchNormPass
from edgec.passes.batchnorm_math import (
    batchnorm_scale_shift,
    fold_batchnorm,
    fold_bias,
    scale_output_channels,
    scale_transposed_conv_weight,
)

from batchnorm_graphs import (  # tests/passes/batchnorm_graphs.py
    LOGGER,
    EPSILON,
    make_model,
    bn_params,
    bn_node,
    randn,
    run,
    seeded_feeds,
    assert_close,
    well_formed,
    ops,
    signature,
    serialized,
    skip_messages,
)


def test_fold_batchnorm_matches_torch_fuse_conv_bn_weights():
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    rng = np.random.default_rng(1)
    weight, bias = randn(rng, 6, 4, 3, 3), randn(rng, 6)
    stats = bn_params(rng, 6)
    gamma, beta, mean, var = stats.values()
    for conv_bias in (bias, None):
        got_weight, got_bias = fold_batchnorm(weight, conv_bias, mean, var, gamma, beta, EPSILON)
        want_weight, want_bias = fuse_conv_bn_weights(
            torch.from_numpy(weight),
            None if conv_bias is None else torch.from_numpy(conv_bias),
            torch.from_numpy(mean),
            torch.from_numpy(var),
            EPSILON,
            torch.from_numpy(gamma),
            torch.from_numpy(beta),
        )
        np.testing.assert_allclose(got_weight, want_weight.detach().numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got_bias, want_bias.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_fold_batchnorm_is_the_docstring_equation():
    rng = np.random.default_rng(2)
    weight, bias = rng.standard_normal((5, 3)), rng.standard_normal(3)  # a (K, N) Gemm weight: channels on axis 1
    gamma, beta, mean, var = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3), rng.standard_normal(3), rng.uniform(0.2, 3, 3)
    got_weight, got_bias = fold_batchnorm(weight, bias, mean, var, gamma, beta, 0.01, channel_axis=1)
    inv_std = 1 / np.sqrt(var + 0.01)
    np.testing.assert_allclose(got_weight, weight * (gamma * inv_std)[None, :], rtol=1e-12)
    np.testing.assert_allclose(got_bias, (bias - mean) * gamma * inv_std + beta, rtol=1e-12)
    x = rng.standard_normal((4, 5))
    batchnormed = ((x @ weight + bias) - mean) * gamma * inv_std + beta
    np.testing.assert_allclose(x @ got_weight + got_bias, batchnormed, rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_math_keeps_dtypes_and_handles_missing_terms(dtype):
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((4, 2, 3, 3)).astype(dtype)
    mean, var = rng.standard_normal(4).astype(dtype), rng.uniform(0.5, 2, 4).astype(dtype)
    folded_weight, folded_bias = fold_batchnorm(weight, None, mean, var)  # no bias, no gamma, no beta
    assert folded_weight.dtype == dtype and folded_bias.dtype == dtype
    inv_std = 1 / np.sqrt(var.astype(np.float64) + 1e-5)
    np.testing.assert_allclose(folded_bias, (-mean * inv_std).astype(dtype), rtol=1e-3 if dtype == np.float16 else 1e-6)
    scale, shift = batchnorm_scale_shift(mean, var)
    assert scale.dtype == np.float64 and shift.dtype == np.float64
    assert fold_bias(None, scale, None) is None
    assert fold_bias(np.ones(4, dtype), scale, None).dtype == dtype
    assert scale_output_channels(weight, scale).dtype == dtype


@pytest.mark.parametrize("groups, in_channels, out_per_group", [(1, 4, 6), (2, 4, 3), (4, 4, 2)])
def test_scale_transposed_conv_weight_matches_a_loop(groups, in_channels, out_per_group):
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((in_channels, out_per_group, 2, 2)).astype(np.float32)
    scale = rng.uniform(0.5, 2, groups * out_per_group)
    expected = weight.astype(np.float64).copy()
    per_group = in_channels // groups
    for input_channel in range(in_channels):
        group = input_channel // per_group
        for column in range(out_per_group):
            expected[input_channel, column] *= scale[group * out_per_group + column]
    got = scale_transposed_conv_weight(weight, scale, groups)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6)
    with pytest.raises(ValueError, match="not divisible"):
        scale_transposed_conv_weight(weight[:3], scale, 2)


# --------------------------------------------------------------------------
# graphs that fold
# --------------------------------------------------------------------------


def case_conv(rng, *, bias=True, group=1, channels_in=4, channels_out=6, kernel=(3, 3), stride=1):
    spatial = len(kernel)
    shape_in = [2, channels_in] + [9] * spatial
    inits = {"w": randn(rng, channels_out, channels_in // group, *kernel), **bn_params(rng, channels_out)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = randn(rng, channels_out)
        inputs.append("b")
    nodes = [
        helper.make_node("Conv", inputs, ["c"], name="conv", group=group, pads=[1] * 2 * spatial, strides=[stride] * spatial),
        bn_node("c", "y"),
    ]
    return make_model(nodes, {"x": shape_in}, {"y": None}, inits), {"BatchNormalization"}


def case_conv_transpose(rng, *, group=1, channels_in=4, out_per_group=6, bias=True):
    channels_out = out_per_group * group
    inits = {"w": randn(rng, channels_in, out_per_group, 3, 3), **bn_params(rng, channels_out)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = randn(rng, channels_out)
        inputs.append("b")
    nodes = [
        helper.make_node("ConvTranspose", inputs, ["c"], name="deconv", group=group, strides=[2, 2], pads=[1, 1, 1, 1]),
        bn_node("c", "y"),
    ]
    return make_model(nodes, {"x": [2, channels_in, 5, 5]}, {"y": None}, inits), {"BatchNormalization"}


def case_gemm(rng, *, trans_b=0, bias_shape=(4,), beta=0.5, alpha=0.7):
    inits = {"w": randn(rng, 4, 5) if trans_b else randn(rng, 5, 4), **bn_params(rng, 4)}
    inputs = ["a", "w"]
    if bias_shape is not None:
        inits["c"] = randn(rng, *bias_shape)
        inputs.append("c")
    nodes = [
        helper.make_node("Gemm", inputs, ["g"], name="gemm", transB=trans_b, alpha=alpha, beta=beta),
        bn_node("g", "y"),
    ]
    return make_model(nodes, {"a": [3, 5]}, {"y": None}, inits), {"BatchNormalization"}


def case_matmul(rng, *, with_bias=False):
    inits = {"w": randn(rng, 5, 4), **bn_params(rng, 4)}
    nodes = [helper.make_node("MatMul", ["a", "w"], ["m"], name="matmul")]
    source = "m"
    if with_bias:
        inits["mb"] = randn(rng, 4)
        nodes.append(helper.make_node("Add", ["mb", "m"], ["mplus"], name="matmul_bias"))  # constant first
        source = "mplus"
    nodes.append(bn_node(source, "y"))
    return make_model(nodes, {"a": [3, 5]}, {"y": None}, inits), {"BatchNormalization"}


def case_matmul_rank3_mul_add(rng):
    """Per-column Mul/Add after a batched MatMul: the channels are the last axis, whatever the rank."""
    inits = {"w": randn(rng, 5, 4), "s": rng.uniform(0.5, 2, 4).astype(np.float32), "t": randn(rng, 1, 1, 4)}
    nodes = [
        helper.make_node("MatMul", ["a", "w"], ["m"], name="matmul"),
        helper.make_node("Mul", ["m", "s"], ["ms"], name="mul"),
        helper.make_node("Add", ["ms", "t"], ["y"], name="add"),
    ]
    return make_model(nodes, {"a": [2, 3, 5]}, {"y": None}, inits), {"Mul"}


def case_conv_mul_add(rng, *, shape=(6, 1, 1), constant_first=False, scalar_mul=False):
    """A batch norm exported as x * s + t after a Conv."""
    inits = {
        "w": randn(rng, 6, 4, 3, 3),
        "s": np.float32(0.75) if scalar_mul else (rng.uniform(0.5, 1.5, 6) * rng.choice([-1, 1], 6)).astype(np.float32).reshape(shape),
        "t": randn(rng, 6).reshape(shape),
    }
    mul_inputs = ["s", "c"] if constant_first else ["c", "s"]
    add_inputs = ["t", "cs"] if constant_first else ["cs", "t"]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", mul_inputs, ["cs"], name="mul"),
        helper.make_node("Add", add_inputs, ["y"], name="add"),
    ]
    return make_model(nodes, {"x": [2, 4, 9, 9]}, {"y": None}, inits), {"Mul", "Add"}


def case_constant_subgraphs(rng):
    """Weight = Identity(initializer); bias, mean = Constant nodes; gamma = ConstantOfShape; var = Abs(Constant)."""
    stats = bn_params(rng, 6)

    def constant(name, array):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))

    nodes = [
        helper.make_node("Identity", ["w_init"], ["w"], name="w_identity"),
        constant("b", randn(rng, 6)),
        constant("gamma_shape", np.array([6], dtype=np.int64)),
        helper.make_node(
            "ConstantOfShape", ["gamma_shape"], ["bn.scale"], value=numpy_helper.from_array(np.array([1.25], np.float32))
        ),
        constant("bn.mean", stats["bn.mean"]),
        constant("var_signed", -stats["bn.var"]),
        helper.make_node("Abs", ["var_signed"], ["bn.var"], name="var_abs"),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "y"),
    ]
    inits = {"w_init": randn(rng, 6, 4, 3, 3), "bn.bias": stats["bn.bias"]}
    return make_model(nodes, {"x": [2, 4, 9, 9]}, {"y": None}, inits), {"BatchNormalization", "ConstantOfShape", "Abs"}


def case_bn_output_also_feeds_a_node(rng):
    """The BN output is a graph output and is read by a Relu: the folded Conv must produce 'y'."""
    inits = {"w": randn(rng, 6, 4, 3, 3), "b": randn(rng, 6), **bn_params(rng, 6)}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "y"),
        helper.make_node("Relu", ["y"], ["z"], name="relu"),
    ]
    return make_model(nodes, {"x": [2, 4, 9, 9]}, {"y": None, "z": None}, inits), {"BatchNormalization"}


def case_chain(rng):
    """Conv -> BN -> BN -> Mul -> Add (a Caffe BN + Scale pair, twice): everything lands in the Conv."""
    inits = {
        "w": randn(rng, 6, 4, 3, 3),
        **bn_params(rng, 6, "bn1"),
        **bn_params(rng, 6, "bn2"),
        "s": rng.uniform(0.5, 1.5, (1, 6, 1, 1)).astype(np.float32),
        "t": randn(rng, 6, 1, 1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "c1", "bn1", "bn1"),
        bn_node("c1", "c2", "bn2", "bn2"),
        helper.make_node("Mul", ["c2", "s"], ["c3"], name="mul"),
        helper.make_node("Add", ["c3", "t"], ["y"], name="add"),
    ]
    return make_model(nodes, {"x": [2, 4, 9, 9]}, {"y": None}, inits), {"BatchNormalization", "Mul", "Add"}


def case_shared_weight(rng):
    """Two Convs share W; only one is followed by a BN: the other keeps the original W."""
    inits = {"w": randn(rng, 6, 4, 3, 3), **bn_params(rng, 6)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "y"),
        helper.make_node("Conv", ["x", "w"], ["z"], name="conv_shared", pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, {"x": [2, 4, 9, 9]}, {"y": None, "z": None}, inits), {"BatchNormalization"}


MATCHING = {
    "conv": lambda rng: case_conv(rng),
    "conv_no_bias": lambda rng: case_conv(rng, bias=False),
    "conv_grouped": lambda rng: case_conv(rng, group=2),
    "conv_depthwise": lambda rng: case_conv(rng, group=4, channels_out=4, stride=2),
    "conv_depthwise_multiplier": lambda rng: case_conv(rng, group=4, channels_out=8, bias=False),
    "conv1d": lambda rng: case_conv(rng, kernel=(3,)),
    "conv3d": lambda rng: case_conv(rng, kernel=(1, 3, 3)),
    "conv_transpose": lambda rng: case_conv_transpose(rng),
    "conv_transpose_grouped": lambda rng: case_conv_transpose(rng, group=2, out_per_group=3),
    "conv_transpose_depthwise_no_bias": lambda rng: case_conv_transpose(rng, group=4, out_per_group=2, bias=False),
    "gemm": lambda rng: case_gemm(rng),
    "gemm_transB_no_bias": lambda rng: case_gemm(rng, trans_b=1, bias_shape=None),
    "gemm_bias_per_row": lambda rng: case_gemm(rng, trans_b=1, bias_shape=(3, 1), beta=2.0),
    "matmul": lambda rng: case_matmul(rng),
    "matmul_add_bias": lambda rng: case_matmul(rng, with_bias=True),
    "matmul_rank3_mul_add": case_matmul_rank3_mul_add,
    "conv_mul_add_c11": lambda rng: case_conv_mul_add(rng),
    "conv_mul_add_1c11_constant_first": lambda rng: case_conv_mul_add(rng, shape=(1, 6, 1, 1), constant_first=True),
    "conv_mul_scalar_add": lambda rng: case_conv_mul_add(rng, scalar_mul=True),
    "constant_subgraphs": case_constant_subgraphs,
    "bn_output_also_feeds_a_node": case_bn_output_also_feeds_a_node,
    "chain": case_chain,
    "shared_weight": case_shared_weight,
}


@pytest.mark.parametrize("case", sorted(MATCHING))
def test_folds(case, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    model, gone = MATCHING[case](np.random.default_rng(10))
    well_formed(model)
    feeds = seeded_feeds(model)
    before = run(model, feeds)
    before_signature, before_ops = signature(model), ops(model)
    assert any(before_ops[op] for op in gone)

    result = FoldBatchNormPass()(model)

    assert result.modified is True
    assert result.model is model
    well_formed(model)
    after_ops = ops(model)
    assert not any(after_ops[op] for op in gone), after_ops
    assert sum(after_ops.values()) <= sum(before_ops.values())
    assert signature(model) == before_signature  # graph input/output names, shapes, dtypes
    assert_close(run(model, feeds), before)
    assert skip_messages(caplog) == []
    # nothing is left to fold: a second run reports no change and changes nothing
    frozen = serialized(model)
    assert FoldBatchNormPass()(model).modified is False
    assert serialized(model) == frozen


def test_folds_params_and_names(caplog):
    """Conv -> BN: one node left, the BN parameters gone, the Conv now writes the BN's output name."""
    model, _ = case_conv(np.random.default_rng(11))
    FoldBatchNormPass()(model)
    (conv,) = list(model.graph)
    assert conv.op_type == "Conv" and conv.name == "conv"
    assert conv.outputs[0].name == "y" and conv.outputs[0] is model.graph.outputs[0]
    assert sorted(model.graph.initializers) == ["b", "w"]  # folded in place of the old ones, names kept


def test_matmul_becomes_matmul_add():
    model, _ = case_matmul(np.random.default_rng(12))
    FoldBatchNormPass()(model)
    assert [node.op_type for node in model.graph] == ["MatMul", "Add"]
    assert model.graph.outputs[0].producer().op_type == "Add"


def test_shared_weight_keeps_the_original_for_the_other_conv():
    rng = np.random.default_rng(10)
    model, _ = case_shared_weight(rng)
    original = model.graph.initializers["w"].const_value.numpy().copy()
    FoldBatchNormPass()(model)
    shared = next(node for node in model.graph if node.name == "conv_shared")
    folded = next(node for node in model.graph if node.name == "conv")
    np.testing.assert_array_equal(shared.inputs[1].const_value.numpy(), original)
    assert folded.inputs[1] is not shared.inputs[1]


# --------------------------------------------------------------------------
# graphs that must not fold
# --------------------------------------------------------------------------


def nonmatch_conv_has_other_consumers(rng):
    inits = {"w": randn(rng, 6, 4, 3, 3), **bn_params(rng, 6)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("c", "y"),
        helper.make_node("Relu", ["c"], ["z"], name="relu"),
    ]
    model = make_model(nodes, {"x": [1, 4, 6, 6]}, {"y": None, "z": None}, inits)
    return model, "BatchNormalization 'bn' not folded: the output of Conv 'conv' has other consumers (Relu 'relu')"


def nonmatch_conv_output_is_graph_output(rng):
    inits = {"w": randn(rng, 6, 4, 3, 3), **bn_params(rng, 6)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    model = make_model(nodes, {"x": [1, 4, 6, 6]}, {"y": None, "c": None}, inits)
    return model, "BatchNormalization 'bn' not folded: the output of Conv 'conv' is also a graph output"


def nonmatch_statistics_not_constant(rng):
    inits = {"w": randn(rng, 6, 4, 3, 3), **bn_params(rng, 6)}
    del inits["bn.mean"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    model = make_model(nodes, {"x": [1, 4, 6, 6], "bn.mean": [6]}, {"y": None}, inits)
    return model, "BatchNormalization 'bn' not folded: its input_mean 'bn.mean' is not a constant"


def nonmatch_statistics_overridable(rng):
    """IR >= 4: an initializer that is also a graph input may be overridden by the caller."""
    inits = {"w": randn(rng, 6, 4, 3, 3), **bn_params(rng, 6)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    extra = [helper.make_tensor_value_info("bn.var", TensorProto.FLOAT, [6])]
    model = make_model(nodes, {"x": [1, 4, 6, 6]}, {"y": None}, inits, graph_inputs_extra=extra)
    return model, "BatchNormalization 'bn' not folded: its input_var 'bn.var' is not a constant"


def nonmatch_training_mode(rng):
    inits = {"w": randn(rng, 6, 4, 3, 3), **bn_params(rng, 6)}
    names = ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", names, ["y", "running_mean", "running_var"], name="bn", training_mode=1),
    ]
    model = make_model(nodes, {"x": [1, 4, 6, 6]}, {"y": None, "running_mean": [6], "running_var": [6]}, inits, opset=15)
    return model, "BatchNormalization 'bn' not folded: it is in training mode (training_mode=1)"


def nonmatch_running_statistics_used(rng):
    """Opset 9: no training_mode attribute, but the running-mean output is a graph output."""
    inits = {"w": randn(rng, 6, 4, 3, 3), **bn_params(rng, 6)}
    names = ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node(
            "BatchNormalization", names, ["y", "running_mean", "running_var", "saved_mean", "saved_var"], name="bn"
        ),
    ]
    model = make_model(nodes, {"x": [1, 4, 6, 6]}, {"y": None, "running_mean": [6]}, inits, opset=9)
    return model, "BatchNormalization 'bn' not folded: its running-statistics output 'running_mean' is used (training mode)"


def nonmatch_graph_input(rng):
    nodes = [bn_node("x", "y", name="bn3")]
    model = make_model(nodes, {"x": [1, 6, 4, 4]}, {"y": None}, bn_params(rng, 6))
    return model, "BatchNormalization 'bn3' not folded: its input is a graph input, not a Conv, ConvTranspose, Gemm or MatMul"


def nonmatch_after_relu(rng):
    inits = {"w": randn(rng, 6, 4, 3, 3), **bn_params(rng, 6)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        bn_node("r", "y"),
    ]
    model = make_model(nodes, {"x": [1, 4, 6, 6]}, {"y": None}, inits)
    return model, "BatchNormalization 'bn' not folded: its input comes from Relu 'relu', not a Conv, ConvTranspose, Gemm or MatMul"


def nonmatch_weight_is_graph_input(rng):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    model = make_model(nodes, {"x": [1, 4, 6, 6], "w": [6, 4, 3, 3]}, {"y": None}, bn_params(rng, 6))
    return model, "BatchNormalization 'bn' not folded: the weight of Conv 'conv' is not a constant"


def nonmatch_gemm_bias_not_constant(rng):
    nodes = [helper.make_node("Gemm", ["a", "w", "c"], ["g"], name="gemm"), bn_node("g", "y")]
    model = make_model(nodes, {"a": [3, 5], "c": [4]}, {"y": None}, {"w": randn(rng, 5, 4), **bn_params(rng, 4)})
    return model, "BatchNormalization 'bn' not folded: the bias of Gemm 'gemm' is not a constant"


def nonmatch_matmul_rank3(rng):
    """BN normalises axis 1 (here 3 rows), the MatMul's channels are its last axis."""
    nodes = [helper.make_node("MatMul", ["a", "w"], ["m"], name="matmul"), bn_node("m", "y")]
    model = make_model(nodes, {"a": [2, 3, 5]}, {"y": None}, {"w": randn(rng, 5, 4), **bn_params(rng, 3)})
    return model, (
        "BatchNormalization 'bn' not folded: MatMul 'matmul' gives an output of rank 3: BatchNormalization "
        "normalises axis 1, the MatMul's output channels are its last axis"
    )


def nonmatch_mul_not_per_channel(rng):
    """A (6,) constant broadcasts along the last (width) axis of an N x 6 x 6 x 6 output, not the channels."""
    inits = {"w": randn(rng, 6, 4, 3, 3), "s": rng.uniform(0.5, 2, 6).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "s"], ["y"], name="mul"),
    ]
    model = make_model(nodes, {"x": [1, 4, 6, 6]}, {"y": None}, inits)
    return model, (
        "Mul 'mul' not folded: its constant 's' of shape (6,) is not per channel along axis 1 "
        "of the rank-4 output of Conv 'conv' (6 channels)"
    )


NON_MATCHING = {
    "conv_has_other_consumers": nonmatch_conv_has_other_consumers,
    "conv_output_is_graph_output": nonmatch_conv_output_is_graph_output,
    "statistics_not_constant": nonmatch_statistics_not_constant,
    "statistics_overridable": nonmatch_statistics_overridable,
    "training_mode": nonmatch_training_mode,
    "running_statistics_used": nonmatch_running_statistics_used,
    "graph_input": nonmatch_graph_input,
    "after_relu": nonmatch_after_relu,
    "weight_is_graph_input": nonmatch_weight_is_graph_input,
    "gemm_bias_not_constant": nonmatch_gemm_bias_not_constant,
    "matmul_rank3": nonmatch_matmul_rank3,
    "mul_not_per_channel": nonmatch_mul_not_per_channel,
}


@pytest.mark.parametrize("case", sorted(NON_MATCHING))
def test_does_not_fold(case, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    model, message = NON_MATCHING[case](np.random.default_rng(20))
    well_formed(model)
    before = serialized(model)

    result = FoldBatchNormPass()(model)

    assert result.modified is False
    assert serialized(model) == before  # not a single byte changed
    assert skip_messages(caplog) == [message]


def test_plain_mul_add_are_not_candidates(caplog):
    """A residual Add and a Mul of two activations are no batch norm: no log line, no change."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    inits = {"w": randn(np.random.default_rng(21), 4, 4, 3, 3)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "x"], ["r"], name="residual"),
        helper.make_node("Mul", ["r", "x"], ["y"], name="gate"),
    ]
    model = make_model(nodes, {"x": [1, 4, 6, 6]}, {"y": None}, inits)
    before = serialized(model)
    assert FoldBatchNormPass()(model).modified is False
    assert serialized(model) == before
    assert skip_messages(caplog) == []


# --------------------------------------------------------------------------
# lower_unfolded, preconditions, the registry
# --------------------------------------------------------------------------


def test_lower_unfolded_rewrites_a_standalone_batchnorm(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    model, _ = nonmatch_graph_input(np.random.default_rng(22))
    feeds = seeded_feeds(model)
    before, before_signature = run(model, feeds), signature(model)

    result = FoldBatchNormPass(lower_unfolded=True)(model)

    assert result.modified is True
    well_formed(model)
    assert [node.op_type for node in model.graph] == ["Mul", "Add"]
    assert signature(model) == before_signature
    assert_close(run(model, feeds), before)
    assert skip_messages(caplog) == [
        "BatchNormalization 'bn3' not folded: its input is a graph input, not a Conv, ConvTranspose, Gemm or MatMul; "
        "lowered to Mul+Add"
    ]


def test_lower_unfolded_keeps_batchnorms_it_cannot_express(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    model, message = nonmatch_statistics_not_constant(np.random.default_rng(23))
    before = serialized(model)
    assert FoldBatchNormPass(lower_unfolded=True)(model).modified is False
    assert serialized(model) == before
    assert skip_messages(caplog) == [message]


def test_requires_opset_7_or_later():
    rng = np.random.default_rng(24)
    model = make_model([bn_node("x", "y")], {"x": [1, 6, 4, 4]}, {"y": None}, bn_params(rng, 6), opset=6, ir_version=3)
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 7"):
        FoldBatchNormPass()(model)
    wrapped = edgec.Model(graph=model, source=None, source_format="onnx-ir", source_sha256=None)
    with pytest.raises(PassError, match="fold-bn"):
        apply_passes(wrapped, [FoldBatchNormPass()], measure=False)


def test_registry_and_config_only():
    from edgec.passes.registry import all_passes, parse

    assert FoldBatchNormPass in PASSES
    assert all_passes()["fold-bn"] is FoldBatchNormPass
    configured = parse("fold-bn:lower_unfolded=true")
    assert configured == FoldBatchNormPass(lower_unfolded=True)
    assert isinstance(configured, ir.passes.InPlacePass)
    with pytest.raises(Exception, match="cannot assign|frozen"):
        configured.lower_unfolded = False  # config only, immutable
    # one instance, two models: nothing carried over from the first call
    fold = FoldBatchNormPass()
    first, _ = case_conv(np.random.default_rng(25))
    second, _ = case_gemm(np.random.default_rng(26))
    assert fold(first).modified and fold(second).modified
    assert vars(fold) == {"lower_unfolded": False}
