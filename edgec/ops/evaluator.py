"""onnx's ReferenceEvaluator for graphs holding edgec ops: the ops' NumPy references, and the
QDQ nodes of an int8 graph at opsets before 19.

Where ONNX Runtime cannot run a graph (it has edgec ops), this evaluator is the one that can:
the verification oracle (``runtimes/reference.py``) and the int8 pass's calibration of a graph
with block-sparse layers (``passes/calibration.py``) both use it. onnx's evaluator implements
DequantizeLinear from opset 19 only; quantize-int8 writes opset 13's form (per-tensor, or
per-axis on a 1-D scale), which the newer versions compute identically at their attributes'
defaults, so that implementation serves the older opsets too.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from edgec.core.model import STANDARD_DOMAINS, onnx_opset
from edgec.ops import DOMAIN, load_all

__all__ = ["numpy_evaluator"]


def numpy_evaluator(graph: ir.Model) -> Any | None:
    """A ReferenceEvaluator of ``graph`` (``.run(None, feeds)``), or None when a node belongs to a
    domain with no NumPy reference here."""
    from onnx.reference import ReferenceEvaluator

    custom = load_all()
    for node in ir.traversal.RecursiveGraphIterator(graph.graph):
        if node.domain not in STANDARD_DOMAINS and (node.domain != DOMAIN or node.op_type not in custom):
            return None
    new_ops = [op.reference for op in custom.values()]
    return ReferenceEvaluator(ir.serde.serialize_model(graph), new_ops=new_ops + _qdq_ops(graph))


def _qdq_ops(graph: ir.Model) -> list[type]:
    """DequantizeLinear for opsets before 19 (none is needed from 19 on, where onnx has its own)."""
    from onnx.reference.ops.op_dequantize_linear import DequantizeLinear_23

    if onnx_opset(graph) >= 19:
        return []

    class DequantizeLinear(DequantizeLinear_23):  # the newest schema's attributes; named as the op
        op_domain = ""

    return [DequantizeLinear]
