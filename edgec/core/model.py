"""The model edgec carries from load to compile."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir


@dataclasses.dataclass
class Model:
    """An ONNX IR model plus where it came from.

    ``graph`` is the ``onnx_ir.Model`` the passes rewrite in place.
    ``torch_reference`` runs the original PyTorch model (NumPy in, NumPy out)
    when the source was PyTorch; it is the reference before any lossy pass.
    ``pass_reports`` collects one report per applied pass, in order.
    ``standard_graph`` is, once a pass has put edgec ops into ``graph``, the
    same model in standard ONNX only: the passes' standard-ONNX outputs
    (``pack=false``: masked dense weights, dequantized weights, Sign kept),
    which ONNX Runtime runs as an independent reference for the build.
    """

    graph: ir.Model
    source: Path | None
    source_format: str
    source_sha256: str | None
    torch_reference: Callable[..., list[Any]] | None = None
    pass_reports: list[Any] = dataclasses.field(default_factory=list)
    standard_graph: ir.Model | None = None
    standard_note: str = ""  # why there is no standard_graph although graph has edgec ops

    @property
    def input_names(self) -> list[str]:
        return [value.name for value in self.graph.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return [value.name for value in self.graph.graph.outputs]


def value_signature(value: ir.Value) -> dict[str, Any]:
    """``{"name", "shape", "dtype"}`` of a graph input or output (symbolic dims as strings)."""
    shape = None
    if value.shape is not None:
        shape = [dim if isinstance(dim, int) else str(dim) for dim in value.shape]
    dtype = value.dtype.numpy().name if value.dtype is not None else None
    return {"name": value.name, "shape": shape, "dtype": dtype}


def index_ranges(graph: ir.Model) -> dict[str, list[int]]:
    """``[low, high]`` of the integer graph inputs that a Gather reads as indices, by input name:
    ``[-s, s - 1]`` for a gathered axis of size ``s`` (the intersection when several Gathers read
    one input). Compiled Gathers do not check their indices (ONNX Runtime does), so run and
    bench check these inputs before running. Indices reaching a Gather through other ops are
    not covered."""
    ranges: dict[str, list[int]] = {}
    for node in graph.graph:
        if not is_standard(node) or node.op_type != "Gather" or len(node.inputs) < 2:
            continue
        data, indices = node.inputs[0], node.inputs[1]
        if indices is None or not indices.is_graph_input() or data is None or data.shape is None:
            continue
        axis = node.attributes.get_int("axis", 0)
        rank = len(data.shape)
        size = data.shape[axis % rank] if -rank <= axis < rank else None
        if not isinstance(size, int):
            continue
        low, high = ranges.get(indices.name, [-size, size - 1])
        ranges[indices.name] = [max(low, -size), min(high, size - 1)]
    return ranges


def input_signatures(graph: ir.Model) -> list[dict[str, Any]]:
    """``value_signature`` of each graph input, with its ``index_range`` where a Gather reads it
    (what the manifest records and what ``edgec.core.inputs.random_inputs`` draws from)."""
    ranges = index_ranges(graph)
    signatures = []
    for value in graph.graph.inputs:
        signature = value_signature(value)
        if value.name in ranges:
            signature["index_range"] = ranges[value.name]  # checked by run/bench before running
        signatures.append(signature)
    return signatures


STANDARD_DOMAINS = ("", "ai.onnx")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def is_standard(node: ir.Node) -> bool:
    """Whether ``node`` is one of ONNX's own operators (not edgec's or another custom domain's)."""
    return node.domain in STANDARD_DOMAINS


def onnx_opset(graph: ir.Model, default: int | None = 1) -> int | None:
    """The ai.onnx opset ``graph`` imports (either spelling of the domain), else ``default``."""
    return graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", default))


def has_custom_ops(graph: ir.Model) -> bool:
    """Whether a node of ``graph`` (subgraphs included) belongs to a domain other than ONNX's own
    (edgec's ops): ONNX Runtime cannot run it."""
    return any(not is_standard(node) for node in ir.traversal.RecursiveGraphIterator(graph.graph))


def first_qdq_node(graph: ir.Model) -> ir.Node | None:
    """The first QuantizeLinear or DequantizeLinear node of ``graph`` (a QDQ, int8 graph), or None."""
    return next((node for node in graph.graph if is_standard(node) and node.op_type in QDQ_OPS), None)
