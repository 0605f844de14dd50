"""Tests of passes/constants.py: the one "is this value a constant" rule of every pass.

Unit cases of ``Constants`` (initializers, overridable inputs, IR < 4 inputs,
constant subgraphs, data paths, non-deterministic ops), then one model whose
weight is computed in the graph (``Reshape`` of an initializer) given to every
pass: each one must treat that weight as the constant it is, rewrite the
layer, and drop the dead subgraph with it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec.passes import FoldBatchNormPass, FuseFiltersPass, LowerBinaryPass, LowerTernaryPass, PackBlockSparsePass
from edgec.passes.constants import Constants
from edgec.runtimes.reference import run_numpy_reference, run_onnxruntime

CHANNELS = 8


def _model(nodes, inputs, outputs, initializers, ir_version: int = 8, listed_initializers: bool = False) -> ir.Model:
    tensors = [numpy_helper.from_array(np.asarray(array), name) for name, array in initializers.items()]
    graph_inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()]
    if listed_initializers:  # IR < 4: every initializer is a graph input too
        graph_inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors]
    graph = helper.make_graph(
        nodes,
        "constants_test",
        graph_inputs,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()],
        tensors,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version)
    return ir.serde.deserialize_model(proto)


def _values(model: ir.Model) -> dict[str, ir.Value]:
    found = {value.name: value for value in model.graph.inputs}
    found.update(model.graph.initializers)
    for node in model.graph:
        found.update((value.name, value) for value in node.outputs)
    return found


# ---- the rule ----------------------------------------------------------------------------------


def test_initializers_subgraphs_and_shapes_are_constant_data_is_not():
    flat = np.arange(12, dtype=np.float32)
    model = _model(
        [
            helper.make_node("Reshape", ["flat", "shape"], ["w"]),
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("Relu", ["x"], ["data"]),
            helper.make_node("Mul", ["data", "wt"], ["mixed"]),
            helper.make_node("Shape", ["x"], ["x_shape"]),
            helper.make_node("RandomNormal", [], ["noise"], shape=[2, 2]),
        ],
        {"x": [4, 3]},
        {"mixed": [4, 3]},
        {"flat": flat, "shape": np.array([3, 4], np.int64)},
    )
    nodes_before = len(model.graph)
    constant = Constants(model)
    values = _values(model)
    np.testing.assert_array_equal(constant(values["flat"]), flat)
    np.testing.assert_array_equal(constant(values["wt"]), flat.reshape(3, 4).T)
    np.testing.assert_array_equal(constant(values["x_shape"]), [4, 3])  # Shape of a static value needs no data
    assert constant(values["x"]) is None
    assert constant(values["data"]) is None
    assert constant(values["mixed"]) is None
    assert constant(values["noise"]) is None
    assert constant(None) is None
    assert len(model.graph) == nodes_before  # evaluated, not folded: the graph is left as it is


def test_an_initializer_that_is_a_graph_input_is_constant_only_before_ir4():
    """From IR 4 on a caller may feed an initializer listed as an input; before, every one was listed."""
    weight = np.ones((2, 2), np.float32)
    for ir_version, expected in ((8, None), (3, weight)):
        model = _model(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            {"x": [2, 2]},
            {"y": [2, 2]},
            {"w": weight},
            ir_version=ir_version,
            listed_initializers=True,
        )
        got = Constants(model)(model.graph.initializers["w"])
        if expected is None:
            assert got is None
        else:
            np.testing.assert_array_equal(got, expected)


# ---- every pass, one rule ----------------------------------------------------------------------


def _computed_weight_model() -> tuple[ir.Model, ir.Model]:
    """x -> Conv 'conv' (weight = Reshape of a flat initializer, +-a per channel) -> BN -> Relu -> Conv 'head'."""
    rng = np.random.default_rng(0)
    codes = np.where(rng.standard_normal((CHANNELS, CHANNELS)) < 0, -1.0, 1.0)
    weight = (codes * rng.uniform(0.1, 0.5, (CHANNELS, 1))).astype(np.float32)
    initializers = {
        "conv.flat": weight.reshape(-1),
        "conv.shape": np.array([CHANNELS, CHANNELS, 1, 1], np.int64),
        "bn.gamma": rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32),
        "bn.beta": rng.standard_normal(CHANNELS).astype(np.float32),
        "bn.mean": rng.standard_normal(CHANNELS).astype(np.float32),
        "bn.var": rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32),
        "head.w": rng.standard_normal((4, CHANNELS, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Reshape", ["conv.flat", "conv.shape"], ["conv.w"], name="conv_weight"),
        helper.make_node("Conv", ["x", "conv.w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "bn.gamma", "bn.beta", "bn.mean", "bn.var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "head.w"], ["y"], name="head"),
    ]
    model = _model(nodes, {"x": [1, CHANNELS, 5, 5]}, {"y": [1, 4, 5, 5]}, initializers)
    return model, ir.serde.deserialize_model(ir.serde.serialize_model(model))  # and an untouched copy


EVERY_PASS = {
    "fold-bn": FoldBatchNormPass(),
    "fuse-filters": FuseFiltersPass(ratio=0.5),
    "block-sparse": PackBlockSparsePass(n=4, sparsity=0.5),
    "binary": LowerBinaryPass(),
    "ternary": LowerTernaryPass(),
}
# passes whose rewrite of the computed-weight layer keeps the function (float rounding aside)
EXACT = ("fold-bn", "binary", "ternary")


@pytest.mark.parametrize("name", list(EVERY_PASS))
def test_every_pass_takes_a_computed_weight_as_constant(name):
    model, _ = _computed_weight_model()
    result = EVERY_PASS[name](model)
    assert result.modified
    layer_ops = {node.name: (node.domain, node.op_type) for node in model.graph}
    assert "conv_weight" not in layer_ops  # the weight's subgraph died with the old weight
    assert "conv.flat" not in model.graph.initializers
    if name == "fold-bn":
        assert "bn" not in layer_ops
    elif name == "fuse-filters":
        conv = next(node for node in model.graph if node.name == "conv")
        assert conv.inputs[1].const_value.shape[0] == CHANNELS // 2
    else:
        assert any(domain == "edgec" for domain, _ in layer_ops.values())


@pytest.mark.parametrize("name", EXACT)
def test_rewriting_a_computed_weight_keeps_the_function(name):
    """ONNX Runtime on the original graph against the rewritten one (edgec's NumPy references
    for the custom ops); rtol 1e-5, atol 1e-5 x max|want|."""
    model, original = _computed_weight_model()
    assert EVERY_PASS[name](model).modified
    x = np.random.default_rng(1).standard_normal((1, CHANNELS, 5, 5)).astype(np.float32)
    (want,) = run_onnxruntime(original, [x])
    (got,) = run_numpy_reference(model, [x])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
