"""ONNX IR -> TVM Relax.

Standard ops go through TVM's Relax ONNX importer; edgec's custom ops
(domain ``edgec``, see edgec/ops) through their own lowerings, hooked into
the importer's per-node dispatch. Unsupported operators are found before
any conversion or build starts, and reported all at once with node names.
"""

from __future__ import annotations

import contextlib
import functools
import io
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
    from edgec.ops import DOMAIN, load_all

    supported = supported_onnx_ops()
    custom = load_all()
    bad = []
    for node in ir.traversal.RecursiveGraphIterator(graph.graph):
        if node.domain == DOMAIN:
            if node.op_type not in custom:
                bad.append(f"{node.domain}.{node.op_type} (node {node.name!r})")
        elif node.domain not in _ONNX_DOMAINS:
            bad.append(f"{node.domain}.{node.op_type} (node {node.name!r})")
        elif node.op_type not in supported:
            bad.append(f"{node.op_type} (node {node.name!r})")
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise UnsupportedOpError(
            f"{len(bad)} node(s) use operators edgec cannot lower: {shown}. "
            "Replace them in the model, or export with a different opset"
        )


def _importer_class():
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    from edgec.ops import load_all

    class EdgecImporter(ONNXGraphImporter):
        """TVM's importer, with edgec's custom ops dispatched to their lowerings."""

        target = None

        def _check_for_unsupported_ops(self, graph) -> None:
            pass  # check_supported ran on the IR, custom ops included

        def _convert_operator(self, op_name, inputs, attrs, opset):
            op = load_all().get(op_name)
            if op is None:
                return super()._convert_operator(op_name, inputs, attrs, opset)
            from tvm import relax

            expr = op.lower(self.bb, list(inputs), attrs, self.target)
            return self.bb.normalize(expr) if isinstance(expr, relax.Expr) else expr

    return EdgecImporter


def to_relax(graph: ir.Model, target=None):
    """Convert to a Relax IRModule with weights as constants; ``target`` (ResolvedTarget)
    lets custom-op lowerings pick vector widths."""
    check_supported(graph)
    proto = ir.serde.serialize_model(graph)
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 17))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            importer = _importer_class()({}, "float32", keep_params_in_input=False, sanitize=False)
            importer.target = target
            return importer.from_onnx(proto.graph, opset)
    except (BuildError, UnsupportedOpError):
        raise
    except Exception as error:  # noqa: BLE001 - the frontend raises many types
        raise BuildError(f"TVM could not convert the ONNX graph to Relax: {error}") from error
