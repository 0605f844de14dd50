"""Reference executions: ONNX Runtime on the ONNX graph, PyTorch on the source."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from edgec.core.ort import ORT_MAX_IR_VERSION, onnxruntime_session

__all__ = [
    "ORT_MAX_IR_VERSION", "has_custom_ops", "is_quantized", "qdq_references", "onnxruntime_session", "reference_outputs", "run_numpy_reference",
    "run_onnxruntime",
]


def run_onnxruntime(graph: ir.Model, inputs: Sequence[np.ndarray], *, optimize: bool = True) -> list[np.ndarray]:
    """ONNX Runtime's outputs; ``optimize=False`` runs every node as written (see edgec/core/ort.py)."""
    session = onnxruntime_session(graph, optimize=optimize)
    names = [value.name for value in session.get_inputs()]
    return list(session.run(None, dict(zip(names, inputs, strict=True))))


def qdq_references(graph: ir.Model, inputs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """ONNX Runtime on a QDQ graph twice: every node as written (the reference), and with its graph
    optimisations (its fused integer kernels; None when ORT refuses to fuse it), whose distance to the
    first is what two correct implementations differ by (edgec.core.numerics.int8_tolerance)."""
    as_written = run_onnxruntime(graph, inputs, optimize=False)
    try:
        fused = run_onnxruntime(graph, inputs, optimize=True)
    except Exception:  # noqa: BLE001 - an optimisation ORT cannot apply: the as-written run alone
        fused = None
    return as_written, fused


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
