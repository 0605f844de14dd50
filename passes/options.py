"""What a pass declares about its options: field help, and the check that options naming
nodes name nodes of the graph. Every pass imports this; the pass table (passes/registry.py)
imports the passes."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import onnx_ir as ir

from edgec.core.model import STANDARD_DOMAINS, first_qdq_node


def option_help(text: str) -> dict[str, str]:
    """Field metadata for an option: ``field(default=0.5, metadata=option_help("..."))``."""
    return {"help": text}


def require_node_names(
    model: ir.Model, names: Iterable[str], option: str, pass_name: str, *, output_names: bool = False
) -> None:
    """A pass's ``requires`` hook for options that name nodes (``exclude``, ``layers``): a
    PreconditionError naming the first name no node of the graph has, with the closest ones,
    instead of a typo silently matching nothing. ``output_names``: a node's first output
    name counts too (for passes that match nodes by either)."""
    known: dict[str, str] = {}
    for node in model.graph:
        candidates = [node.name] + ([node.outputs[0].name] if output_names and node.outputs else [])
        for name in candidates:
            if name:
                known.setdefault(name, node.op_type)
    for name in names:
        if name in known:
            continue
        layers = [known_name for known_name, op in known.items() if op in ("Conv", "Gemm", "MatMul")]
        close = difflib.get_close_matches(name, layers or list(known), n=3)
        if close:
            hint = f"did you mean {', '.join(repr(item) for item in close)}?"
        else:
            hint = f"its Conv/Gemm/MatMul nodes are {', '.join(layers[:6]) or 'none'}{' ...' if len(layers) > 6 else ''}"
        raise ir.passes.PreconditionError(
            f"{option}={name!r} names no node of the graph ({hint}); `edgec inspect MODEL` lists the node names"
        )


INT8_WITH_CODED_OPS = (
    "int8 together with binary or ternary layers is not supported yet: their standard-ONNX twin, which the "
    "int8 build is verified on, would quantize the layers the edgec ops keep coded. Compile with quantize-int8 "
    "and fold-bn/fuse-filters/block-sparse, or with binary/ternary without quantize-int8"
)
INT8_BEFORE_PACKING = (
    "run quantize-int8 after the packing passes (-p block-sparse ... -p quantize-int8): they do not read "
    "dequantized weights; binary and ternary layers do not combine with int8 yet"
)
# node metadata of a layer block-sparse pruned but left a standard Conv/Gemm (``pack=false``, and the
# standard-ONNX twin of a packed graph): quantize-int8 keeps it float, as it keeps the packed ops
BLOCK_SPARSE_LAYER = "edgec.block_sparse"
PACKED_OPS = ("BlockSparseConv", "BlockSparseGemm")  # edgec ops quantize-int8 keeps in float beside int8 layers


def require_standard_ops(model: ir.Model, pass_name: str) -> None:
    """quantize-int8's ``requires`` hook: a PreconditionError naming the first edgec op of the graph
    that it cannot keep in float beside int8 layers (a binary or ternary layer)."""
    for node in model.graph:
        if node.domain not in STANDARD_DOMAINS and node.op_type not in PACKED_OPS:
            raise ir.passes.PreconditionError(
                f"{pass_name} after a pass that emitted edgec ops (node {node.name!r} is "
                f"{node.domain}:{node.op_type}): {INT8_WITH_CODED_OPS}"
            )


def require_float_graph(model: ir.Model, pass_name: str) -> None:
    """A packing pass's ``requires`` hook: a PreconditionError on a QDQ (int8) graph, naming its first
    QuantizeLinear/DequantizeLinear node."""
    node = first_qdq_node(model)
    if node is not None:
        raise ir.passes.PreconditionError(
            f"{pass_name} on an int8 (QDQ) graph (node {node.name!r} is {node.op_type}): {INT8_BEFORE_PACKING}"
        )
