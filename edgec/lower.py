"""ONNX IR -> TVM Relax.

Unsupported operators are found before any conversion or build starts, and
reported all at once with their node names.
"""

from __future__ import annotations

import functools
import logging
import warnings

import onnx_ir as ir

from edgec.errors import BuildError, UnsupportedOpError

log = logging.getLogger(__name__)

_ONNX_DOMAINS = ("", "ai.onnx")


@functools.cache
def supported_onnx_ops() -> frozenset[str]:
    """Operator types TVM's Relax ONNX frontend converts."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map())


def check_supported(graph: ir.Model) -> None:
    """Raise UnsupportedOpError naming every node whose op cannot be lowered."""
    supported = supported_onnx_ops()
    bad = []
    for node in ir.traversal.RecursiveGraphIterator(graph.graph):
        if node.domain not in _ONNX_DOMAINS:
            bad.append(f"{node.domain}.{node.op_type} (node {node.name!r})")
        elif node.op_type not in supported:
            bad.append(f"{node.op_type} (node {node.name!r})")
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise UnsupportedOpError(
            f"{len(bad)} node(s) use operators edgec cannot lower: {shown}. "
            "Replace them in the model, or export with a different opset"
        )


def to_relax(graph: ir.Model):
    """Convert to a Relax IRModule with weights as constants."""
    from tvm.relax.frontend.onnx import from_onnx

    check_supported(graph)
    proto = ir.serde.serialize_model(graph)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return from_onnx(proto, keep_params_in_input=False, sanitize_input_names=False)
    except Exception as error:  # noqa: BLE001 - the frontend raises many types
        raise BuildError(f"TVM could not convert the ONNX graph to Relax: {error}") from error
