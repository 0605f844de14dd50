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

from edgec.core.errors import BuildError, UnsupportedOpError
from edgec.core.fallbacks import one_line
from edgec.core.model import is_standard, onnx_opset

log = logging.getLogger(__name__)


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
        elif not is_standard(node):
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
    import onnx
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    from edgec.ops import load_all

    class EdgecImporter(ONNXGraphImporter):
        """TVM's importer, with edgec's custom ops dispatched to their lowerings; it remembers
        the node it converts (``current_node``) and the first node whose output shape is not
        static although its inputs' shapes are (``dynamic_node``)."""

        target = None
        current_node = None
        dynamic_node = None

        def _check_for_unsupported_ops(self, graph) -> None:
            pass  # check_supported ran on the IR, custom ops included

        def _parse_value_proto(self, value_proto):
            if isinstance(value_proto, onnx.NodeProto):  # called once per node, before converting it
                self.current_node = value_proto
            return super()._parse_value_proto(value_proto)

        def _convert_operator(self, op_name, inputs, attrs, opset):
            from tvm import relax

            op = load_all().get(op_name)
            if op is None:
                result = super()._convert_operator(op_name, inputs, attrs, opset)
            else:
                expr = op.lower(self.bb, list(inputs), attrs, self.target)
                result = self.bb.normalize(expr) if isinstance(expr, relax.Expr) else expr
            if self.dynamic_node is None and not _static(result) and all(_static(arg) for arg in inputs if arg is not None):
                self.dynamic_node = (self.current_node, list(inputs))
            return result

    return EdgecImporter


def _static(expr) -> bool:
    """Whether every tensor shape in ``expr``'s type is known and constant."""
    from tvm import relax, tirx

    def static(ty) -> bool:
        if isinstance(ty, relax.TupleType):
            return all(static(field) for field in ty.fields)
        if isinstance(ty, relax.TensorType):
            return ty.shape is not None and all(isinstance(dim, tirx.IntImm) for dim in ty.shape)
        if isinstance(ty, relax.ShapeType):
            return ty.values is not None and all(isinstance(dim, tirx.IntImm) for dim in ty.values)
        return True

    if isinstance(expr, relax.Tuple):
        return all(_static(field) for field in expr.fields)
    return static(getattr(expr, "ty", None))


def to_relax(graph: ir.Model, target=None):
    """Convert to a Relax IRModule with weights as constants; ``target`` (ResolvedTarget)
    lets custom-op lowerings pick vector widths. A failure names the ONNX node it happened on."""
    check_supported(graph)
    proto = ir.serde.serialize_model(graph)
    opset = onnx_opset(graph, 17)
    importer = _importer_class()({}, "float32", keep_params_in_input=False, sanitize=False)
    importer.target = target
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            mod = importer.from_onnx(proto.graph, opset)
    except (BuildError, UnsupportedOpError):
        raise
    except Exception as error:  # noqa: BLE001 - the frontend raises many types
        if importer.current_node is None:
            raise BuildError(f"TVM could not convert the ONNX graph to Relax: {one_line(error)}") from error
        node = importer.current_node
        raise BuildError(
            f"TVM's ONNX importer failed on {_describe_node(node)} (opset {opset}): {one_line(error)}. "
            + _constant_inputs_hint(graph, node, opset)
        ) from error
    if importer.dynamic_node is not None:
        node, inputs = importer.dynamic_node
        named = zip(_input_names(node, opset), node.input, inputs, strict=False)
        dynamic = [_source(graph, formal, value) for formal, value, arg in named if not _is_constant(arg)][1:]
        given = ", ".join(dynamic) or "its inputs"
        raise BuildError(
            f"{_describe_node(node)} makes a tensor whose shape depends on the values of {given}; edgec compiles "
            "static shapes only. " + _constant_inputs_hint(graph, node, opset)
        )
    return mod


def _describe_node(node) -> str:
    """``node 'expand_1' (Expand)``, or by its first output when the node has no name."""
    if node.name:
        return f"node {node.name!r} ({node.op_type})"
    return f"the {node.op_type} node making {node.output[0]!r}" if node.output else f"a {node.op_type} node"


def _input_names(node, opset: int) -> list[str]:
    """The node's inputs by their names in the operator's schema (Expand: input, shape)."""
    import onnx

    try:
        formal = [parameter.name for parameter in onnx.defs.get_schema(node.op_type, opset, node.domain).inputs]
    except Exception:  # noqa: BLE001 - no schema (custom op): positions instead
        formal = []
    names = []
    for position in range(len(node.input)):
        names.append(formal[min(position, len(formal) - 1)] if formal else f"input {position}")
    return names


def _is_constant(arg) -> bool:
    import tvm
    from tvm import relax

    return arg is None or isinstance(arg, (tvm.ir.expr.Constant, relax.ShapeExpr, tvm.tirx.IntImm, tvm.tirx.FloatImm))


def _source(graph: ir.Model, formal: str, value_name: str) -> str:
    """``input 'shape' (the graph input 'shape')``: a node input and where its value comes from."""
    if value_name in {value.name for value in graph.graph.inputs}:
        return f"input {formal!r} (the graph input {value_name!r})"
    return f"input {formal!r} (the value {value_name!r})"


def _constant_inputs_hint(graph: ir.Model, node, opset: int) -> str:
    """What to do: name the node's inputs (after the data input) that are not constants."""
    constants = set(graph.graph.initializers)
    loose = [
        _source(graph, formal, name) for formal, name in zip(_input_names(node, opset), node.input, strict=False)
        if name and name not in constants
    ][1:]
    if not loose:
        return "Replace this node in the model, or export it with a different opset"
    return (
        f"{node.op_type}'s {', '.join(loose)} must be a constant: make it an initializer, or compute it only "
        "from constants and input shapes (static shapes come from --input-shape) so that edgec folds it"
    )
