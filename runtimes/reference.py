"""Reference executions: ONNX Runtime on the ONNX graph, PyTorch on the source."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from edgec.core.ort import ORT_MAX_IR_VERSION, onnxruntime_session

__all__ = [
    "ORT_MAX_IR_VERSION", "has_custom_ops", "is_quantized", "onnxruntime_session", "reference_outputs", "run_numpy_reference",
    "run_onnxruntime",
]


def run_onnxruntime(graph: ir.Model, inputs: Sequence[np.ndarray], *, optimize: bool = True) -> list[np.ndarray]:
    """ONNX Runtime's outputs; ``optimize=False`` runs every node as written (see edgec/core/ort.py)."""
    session = onnxruntime_session(graph, optimize=optimize)
    names = [value.name for value in session.get_inputs()]
    return list(session.run(None, dict(zip(names, inputs, strict=True))))


def is_quantized(graph: ir.Model) -> bool:
    """A QDQ graph: it holds QuantizeLinear or DequantizeLinear nodes."""
    return any(node.domain in ("", "ai.onnx") and node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.graph)


def has_custom_ops(graph: ir.Model) -> bool:
    return any(node.domain not in ("", "ai.onnx") for node in ir.traversal.RecursiveGraphIterator(graph.graph))


def reference_outputs(graph: ir.Model, inputs: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    """Reference outputs of ``graph`` on ``inputs``: ONNX Runtime for standard graphs,
    onnx's ReferenceEvaluator with edgec's NumPy references when custom ops are present;
    None when a custom op of another domain has no reference."""
    if not has_custom_ops(graph):
        return run_onnxruntime(graph, inputs)
    return run_numpy_reference(graph, inputs)


def run_numpy_reference(graph: ir.Model, inputs: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    from edgec.ops import DOMAIN, load_all

    custom = load_all()
    for node in ir.traversal.RecursiveGraphIterator(graph.graph):
        if node.domain not in ("", "ai.onnx") and (node.domain != DOMAIN or node.op_type not in custom):
            return None
    proto = ir.serde.serialize_model(graph)
    evaluator = ReferenceEvaluator(proto, new_ops=[op.reference for op in custom.values()])
    names = [value.name for value in graph.graph.inputs]
    return [np.asarray(output) for output in evaluator.run(None, dict(zip(names, inputs, strict=True)))]
