"""Reference executions: ONNX Runtime on the ONNX graph, PyTorch on the source."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

# The newest ONNX IR version the pinned onnxruntime (1.31) reads; onnx 1.23 writes
# IR 14 by default although no edgec graph uses anything newer than IR 13 features.
ORT_MAX_IR_VERSION = 13


def onnxruntime_session(graph: ir.Model, threads: int | None = None):
    """An ORT CPU session on ``graph`` (all graph optimisations on)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    proto = ir.serde.serialize_model(graph)
    proto.ir_version = min(proto.ir_version, ORT_MAX_IR_VERSION)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_onnxruntime(graph: ir.Model, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime_session(graph)
    names = [value.name for value in session.get_inputs()]
    return list(session.run(None, dict(zip(names, inputs, strict=True))))


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
