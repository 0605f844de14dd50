"""What a pass declares about its options: field help, and the check that options naming
nodes name nodes of the graph. Every pass imports this; the pass table (passes/registry.py)
imports the passes."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import onnx_ir as ir


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
