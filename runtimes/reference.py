"""Reference executions: ONNX Runtime on the ONNX graph, PyTorch on the source.

Graphs that binarise float values (``Sign``, or a comparison of floats as in
``Where(x >= 0, 1, -1)``) are discontinuous: a value within float32 rounding
of the threshold is binarised differently by two evaluations that round
differently, and one flipped sign moves every output downstream by far more
than any tolerance. edgec's xnor/popcount ops sum exact integers and scale
once; the standard twin of such a build (``pack=false``) has float Convs
with weights ``+-a*s`` that ONNX Runtime sums in float32. So a twin that
binarises is checked in float64 (:func:`run_float64`: onnx's reference
evaluator, since ONNX Runtime has no float64 Conv), which sums those layers
exactly as the ops do; :func:`checking_reference` picks the reference of a
twin. (A graph without edgec ops is float32 in the build and in ONNX
Runtime alike and stays checked by ONNX Runtime.)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from edgec.core.fallbacks import one_line
from edgec.core.model import first_qdq_node, has_custom_ops, is_standard
from edgec.core.ort import ORT_MAX_IR_VERSION, onnxruntime_session

log = logging.getLogger(__name__)

__all__ = [
    "ORT_MAX_IR_VERSION", "QDQ_AS_WRITTEN", "Reference", "build_references", "THRESHOLD_OPS", "binarizing_nodes", "checking_reference", "float64_copy", "has_custom_ops",
    "is_quantized", "qdq_references", "onnxruntime_session", "reference_outputs", "run_float64", "run_numpy_reference",
    "run_onnxruntime",
]


def run_onnxruntime(graph: ir.Model, inputs: Sequence[np.ndarray], *, optimize: bool = True) -> list[np.ndarray]:
    """ONNX Runtime's outputs; ``optimize=False`` runs every node as written (see edgec/core/ort.py)."""
    session = onnxruntime_session(graph, optimize=optimize)
    names = [value.name for value in session.get_inputs()]
    return list(session.run(None, dict(zip(names, inputs, strict=True))))


# ops whose output jumps where a float input crosses a threshold (Sign at 0, the comparisons)
THRESHOLD_OPS = frozenset({"Sign", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"})
FLOAT64_NOTE = "float64 (onnx reference evaluator): the graph binarises float values ({nodes})"


def binarizing_nodes(graph: ir.Model) -> list[str]:
    """The standard nodes of ``graph`` that binarise a float input (THRESHOLD_OPS on FLOAT/FLOAT16/DOUBLE)."""
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)
    return [
        node.name or node.op_type
        for node in ir.traversal.RecursiveGraphIterator(graph.graph)
        if is_standard(node) and node.op_type in THRESHOLD_OPS and node.inputs[0] is not None
        and node.inputs[0].dtype in floats
    ]  # fmt: skip


def float64_copy(graph: ir.Model) -> ir.Model:
    """A copy of ``graph`` that computes in float64: float32 inputs, initializers, Constant
    values and values, and ``Cast(to=FLOAT)``, become float64."""
    proto = ir.serde.serialize_model(graph)
    copy = ir.serde.deserialize_model(proto)
    for value in copy.graph.initializers.values():
        if value.const_value is not None and value.const_value.dtype == ir.DataType.FLOAT:
            value.const_value = ir.tensor(value.const_value.numpy().astype(np.float64), name=value.name)
    for node in ir.traversal.RecursiveGraphIterator(copy.graph):
        for attribute in node.attributes.values():
            if attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype == ir.DataType.FLOAT:
                node.attributes[attribute.name] = ir.AttrTensor(attribute.name, ir.tensor(attribute.value.numpy().astype(np.float64)))
        if node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", int(ir.DataType.DOUBLE))
        for value in [*node.inputs, *node.outputs]:
            if value is not None and value.dtype == ir.DataType.FLOAT:
                value.dtype = ir.DataType.DOUBLE
    for value in [*copy.graph.inputs, *copy.graph.outputs, *copy.graph.initializers.values()]:
        if value.dtype == ir.DataType.FLOAT:
            value.dtype = ir.DataType.DOUBLE
    return copy


def run_float64(graph: ir.Model, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``graph``'s outputs computed in float64 by onnx's reference evaluator (standard ops only)."""
    from onnx.reference import ReferenceEvaluator

    copy = float64_copy(graph)
    evaluator = ReferenceEvaluator(ir.serde.serialize_model(copy))
    feeds = {
        value.name: np.asarray(array, np.float64) if np.asarray(array).dtype == np.float32 else array
        for value, array in zip(copy.graph.inputs, inputs, strict=True)
    }
    return [np.asarray(output) for output in evaluator.run(None, feeds)]


def checking_reference(graph: ir.Model, inputs: Sequence[np.ndarray]) -> tuple[str, list[np.ndarray]]:
    """The reference a build whose standard twin is ``graph`` is checked against, and how it was
    computed: ONNX Runtime, or float64 for a twin that binarises (the module docstring)."""
    nodes = binarizing_nodes(graph)
    if nodes:
        shown = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
        return FLOAT64_NOTE.format(nodes=shown), run_float64(graph, inputs)
    return "onnxruntime", run_onnxruntime(graph, inputs)


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
    return first_qdq_node(graph) is not None


def reference_outputs(graph: ir.Model, inputs: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    """Reference outputs of ``graph`` on ``inputs``: ONNX Runtime for standard graphs,
    onnx's ReferenceEvaluator with edgec's NumPy references when custom ops are present;
    None when a custom op of another domain has no reference."""
    if not has_custom_ops(graph):
        return run_onnxruntime(graph, inputs)
    return run_numpy_reference(graph, inputs)


def run_numpy_reference(graph: ir.Model, inputs: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    from edgec.ops.evaluator import numpy_evaluator

    evaluator = numpy_evaluator(graph)
    if evaluator is None:
        return None
    names = [value.name for value in graph.graph.inputs]
    return [np.asarray(output) for output in evaluator.run(None, dict(zip(names, inputs, strict=True)))]


QDQ_AS_WRITTEN = "model.onnx: QDQ, every node as written"


@dataclasses.dataclass(frozen=True)
class Reference:
    """One reference's outputs for a build's check (``edgec compile``'s verify stage and ``edgec bench``)."""

    name: str  # the manifest's key: onnxruntime, float64, numpy, pytorch
    outputs: list[np.ndarray]
    enforced: bool
    graph: str = ""  # which graph it ran
    quantized: bool = False  # ONNX Runtime on a QDQ graph: the tolerance is in quantization steps
    fused: list[np.ndarray] | None = None  # QDQ: ORT's fused integer kernels on the same inputs
    note: str = ""  # how it was computed / why it is not enforced


def build_references(
    graph: ir.Model, inputs: Sequence[np.ndarray], standard: ir.Model | None = None, standard_label: str = "reference.onnx"
) -> tuple[list[Reference], str]:
    """Every reference a build of ``graph`` (model.onnx) is checked against on ``inputs``, and why
    none could run when the list is empty. The one rule of compile and bench:

    - a QDQ graph: ONNX Runtime on it as written (:func:`qdq_references`; the tolerance is in
      quantization steps, edgec.core.numerics.int8_tolerance);
    - a standard graph: ONNX Runtime, or onnx's reference evaluator where ONNX Runtime refuses it;
    - a graph with edgec ops: its standard twin ``standard`` (reference.onnx; ONNX Runtime, or
      float64 enforced with ONNX Runtime recorded for a twin that binarises, see the module
      docstring) and edgec's NumPy references of the ops.
    """
    if not has_custom_ops(graph) and is_quantized(graph):
        outputs, fused = qdq_references(graph, inputs)
        return [Reference("onnxruntime", outputs, True, QDQ_AS_WRITTEN, quantized=True, fused=fused)], ""
    if not has_custom_ops(graph):
        try:
            return [Reference("onnxruntime", run_onnxruntime(graph, inputs), True, "model.onnx")], ""
        except Exception as error:  # noqa: BLE001 - ONNX Runtime refuses the graph (e.g. opsets before 7)
            return _evaluator_instead(graph, inputs, f"ONNX Runtime: {one_line(error)}")
    found = _twin_references(standard, inputs, standard_label) if standard is not None else []
    numpy_outputs = run_numpy_reference(graph, inputs)
    if numpy_outputs is not None:  # an int8 graph with block-sparse layers: QDQ as written, int8 rule
        found.append(Reference("numpy", numpy_outputs, True, "model.onnx", quantized=is_quantized(graph)))
    return found, "" if found else "no reference can run this graph (custom ops)"


def _twin_references(graph: ir.Model, inputs: Sequence[np.ndarray], label: str) -> list[Reference]:
    if is_quantized(graph):  # int8 with block-sparse layers: the twin is a QDQ graph (float masked layers)
        outputs, fused = qdq_references(graph, inputs)
        return [Reference("onnxruntime", outputs, True, f"{label}, QDQ as written", quantized=True, fused=fused)]
    how, outputs = checking_reference(graph, inputs)
    if how == "onnxruntime":
        return [Reference("onnxruntime", outputs, True, label)]
    float32 = "float32 rounding at its binarisations differs between implementations; the float64 check is enforced"
    return [
        Reference("float64", outputs, True, label, note=how),
        Reference("onnxruntime", run_onnxruntime(graph, inputs), False, label, note=float32),
    ]


def _evaluator_instead(graph: ir.Model, inputs: Sequence[np.ndarray], ort_error: str) -> tuple[list[Reference], str]:
    """onnx's reference evaluator where ONNX Runtime refused a standard graph; the reason when it fails too."""
    log.info("%s; checking against onnx's reference evaluator", ort_error)
    try:
        return [Reference("numpy", run_numpy_reference(graph, inputs), True, "model.onnx")], ""
    except Exception as error:  # noqa: BLE001 - no reference runs this graph
        reason = f"no reference runs this graph ({ort_error}; onnx reference: {one_line(error)})"
        log.warning("verification skipped: %s", reason)
        return [], reason
