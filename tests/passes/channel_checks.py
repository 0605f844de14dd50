"""Model builders and checks shared by the channel-removal tests (test_fuse_filters*.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

import edgec


RTOL = 1e-5  # masked mode is exact up to float32 summation order
ATOL = 1e-5


def to_model(proto: onnx.ModelProto) -> edgec.Model:
    return edgec.from_onnx_ir(ir.serde.deserialize_model(proto))


def conv_channels(model: edgec.Model) -> dict[str, int]:
    """Output channels of every Conv, from its weight."""
    return {node.name: node.inputs[1].const_value.shape[0] for node in model.graph.graph if node.op_type == "Conv"}


def io_signature(model: edgec.Model) -> list[tuple[str, tuple]]:
    graph = model.graph.graph
    return [(value.name, tuple(value.shape)) for value in (*graph.inputs, *graph.outputs)]


def check_valid(model: edgec.Model) -> None:
    """onnx.checker (full) and strict shape inference agree with every shape the pass wrote."""
    proto = ir.serde.serialize_model(model.graph)
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True, check_type=True)
    used = {value.name for node in model.graph.graph for value in node.inputs if value is not None}
    assert set(model.graph.graph.initializers) <= used, "dead initializers left behind"


def sample(model: edgec.Model, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(tuple(value.shape)).astype(np.float32) for value in model.graph.graph.inputs]
