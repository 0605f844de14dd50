"""Tests of passes/channel_analysis.py: which tensors carry a Conv's output channels.

Small graphs built with onnx.helper (shapes inferred), one rule each: layouts
through BatchNormalization and activations, sinks, residual ties, Concat
segments, Flatten blocks, what blocks a group (graph outputs, unfollowed ops,
exclusion), and the per-channel constants tracked for zero-channel removal.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from edgec.passes.channel_analysis import ChannelAnalysis, shrinkable_groups

RNG = np.random.default_rng(0)


def _model(nodes, x_shape, y_shape, initializers) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "channel_analysis_test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.asarray(array), name) for name, array in initializers.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


def _weight(out_channels: int, in_channels: int, kernel: int = 1) -> np.ndarray:
    return RNG.standard_normal((out_channels, in_channels, kernel, kernel)).astype(np.float32)


def _analysed(model: ir.Model, masked: bool = False) -> tuple[ChannelAnalysis, dict[str, ir.Value], dict[str, ir.Node]]:
    analysis = ChannelAnalysis(model, masked=masked)
    analysis.run()
    values = {output.name: output for node in model.graph for output in node.outputs}
    nodes = {node.name: node for node in model.graph}
    return analysis, values, nodes


def _bn_inputs(prefix: str, channels: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.g": np.ones(channels, np.float32),
        f"{prefix}.b": np.zeros(channels, np.float32),
        f"{prefix}.m": np.zeros(channels, np.float32),
        f"{prefix}.v": np.ones(channels, np.float32),
    }


def test_channels_pass_batchnorm_and_relu_to_the_next_conv():
    inits = {"w1": _weight(6, 3), "w2": _weight(4, 6), **_bn_inputs("bn", 6)}
    model = _model(
        [
            helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
            helper.make_node("BatchNormalization", ["c1", "bn.g", "bn.b", "bn.m", "bn.v"], ["n"], name="bn"),
            helper.make_node("Relu", ["n"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
        ],
        [1, 3, 5, 5],
        [1, 4, 5, 5],
        inits,
    )
    analysis, values, nodes = _analysed(model)
    space = analysis.layouts[values["c1"]].segments[0][0]
    assert analysis.spaces[space].source is nodes["conv1"] and analysis.spaces[space].channels == 6
    assert analysis.layouts[values["r"]] == analysis.layouts[values["c1"]]
    assert analysis.batchnorms == [nodes["bn"]]
    assert [(sink.kind, sink.node.name) for sink in analysis.sinks if sink.value.name != "x"] == [("conv", "conv2")]
    groups = list(shrinkable_groups(analysis, exclude=()))
    assert [sources for _, sources, _ in groups] == [[nodes["conv1"]]]  # conv2 reaches the graph output


def test_a_residual_add_ties_two_convs_and_a_graph_output_blocks(caplog):
    inits = {"wa": _weight(4, 3), "wb": _weight(4, 3), "wc": _weight(2, 4)}
    model = _model(
        [
            helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
            helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
            helper.make_node("Add", ["a", "b"], ["s"], name="add"),
            helper.make_node("Conv", ["s", "wc"], ["y"], name="conv_c"),
        ],
        [1, 3, 4, 4],
        [1, 2, 4, 4],
        inits,
    )
    analysis, values, nodes = _analysed(model)
    root_a = analysis.root(analysis.layouts[values["a"]].segments[0][0])
    root_b = analysis.root(analysis.layouts[values["b"]].segments[0][0])
    assert root_a == root_b and analysis.groups[root_a].ties == ["Add 'add'"]
    with caplog.at_level(logging.INFO, logger="edgec.passes.channel_analysis"):
        groups = list(shrinkable_groups(analysis, exclude=("conv_a",)))
    assert groups == []  # the tied pair has an excluded member, conv_c's channels reach the output
    assert "Conv 'conv_a' skipped: excluded by the exclude option" in caplog.text
    assert "Conv 'conv_b' skipped: its output reaches a residual Add 'add' tied to Conv 'conv_a'" in caplog.text
    assert "Conv 'conv_c' skipped: its output channels reach graph output 'y'" in caplog.text


def test_concat_lays_spaces_side_by_side_and_flatten_makes_blocks():
    inits = {"wa": _weight(2, 3), "wb": _weight(3, 3), "fc": RNG.standard_normal((5 * 4, 7)).astype(np.float32)}
    model = _model(
        [
            helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
            helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
            helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
            helper.make_node("Flatten", ["cat"], ["f"], name="flatten"),
            helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc"),
        ],
        [1, 3, 2, 2],
        [1, 7],
        inits,
    )
    analysis, values, _ = _analysed(model)
    cat, flat = analysis.layouts[values["cat"]], analysis.layouts[values["f"]]
    assert [length for _, length in cat.segments] == [2, 3] and cat.channels == 5
    assert flat.segments == cat.segments and flat.rank == 2 and flat.block == 4  # H*W columns per channel
    assert [(sink.kind, sink.node.name) for sink in analysis.sinks if sink.value.name != "x"] == [("matmul", "fc")]
    assert len(list(shrinkable_groups(analysis, exclude=()))) == 2


def test_an_op_the_analysis_does_not_follow_blocks_with_its_name(caplog):
    model = _model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Transpose", ["c"], ["y"], name="transpose", perm=[0, 1, 3, 2]),
        ],
        [1, 3, 4, 5],
        [1, 4, 5, 4],
        {"w": _weight(4, 3)},
    )
    analysis, _, _ = _analysed(model)
    with caplog.at_level(logging.INFO, logger="edgec.passes.channel_analysis"):
        assert list(shrinkable_groups(analysis, exclude=())) == []
    assert "are read by Transpose 'transpose', which the pass does not follow" in caplog.text


def test_masked_analysis_tracks_the_constant_of_zeroed_channels():
    """A zero filter outputs its bias everywhere: Relu(b) after the Relu; others are not constant (NaN)."""
    weight = _weight(3, 2)
    weight[1] = 0.0
    bias = np.array([0.5, -2.0, 1.5], np.float32)
    model = _model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w2"], ["y"], name="head"),
        ],
        [1, 2, 3, 3],
        [1, 2, 3, 3],
        {"w": weight, "b": bias, "w2": _weight(2, 3)},
    )
    analysis, values, _ = _analysed(model, masked=True)
    np.testing.assert_array_equal(analysis.constants[values["c"]], [np.nan, -2.0, np.nan])
    np.testing.assert_array_equal(analysis.constants[values["r"]], [np.nan, 0.0, np.nan])
