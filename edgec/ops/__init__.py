"""edgec's custom ONNX operators (domain ``edgec``).

A custom op is data: its name, a NumPy reference (an ``onnx.reference``
``OpRun`` subclass, so whole graphs run in onnx's ReferenceEvaluator), and a
Relax lowering that emits ``call_tir`` of our own TIR kernel. One package per
op family (``binary``, ``ternary``, ``block_sparse``), each split by layer
(``format``, ``reference``, ``kernels``, ``lowering``), registers its ops in
``CUSTOM_OPS`` through :func:`register`; ``edgec.lower`` and
``edgec.runtimes.reference`` consult it. ``common.py`` holds what the ops
share, ``transposes.py`` the Relax pass that removes their layout wrappers.

Layer: custom ops import the floor (``edgec.core.errors``) and target data
(``edgec.targets.vector``), never passes, runtimes or the compiler.

Custom op type names must not clash with standard ONNX op types: TVM's ONNX
importer dispatches on the op type alone.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

DOMAIN = "edgec"
OPSET_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CustomOp:
    """One custom op.

    ``reference``: an ``onnx.reference.op_run.OpRun`` subclass with
    ``op_domain = "edgec"`` (the NumPy reference); the ReferenceEvaluator
    finds it by class name, so the class is named exactly like the op.
    ``lower(bb, inputs, attrs, target) -> relax.Expr``: emits the op into the
    Relax BlockBuilder; ``inputs`` are Relax exprs (initializers arrive as
    ``relax.Constant``), ``attrs`` the ONNX attributes, ``target`` the
    ResolvedTarget being compiled for (vector width, architecture).
    """

    name: str
    reference: type
    lower: Callable[..., Any]
    summary: str = ""


CUSTOM_OPS: dict[str, CustomOp] = {}


def register(op: CustomOp) -> CustomOp:
    if op.reference.__name__ != op.name or getattr(op.reference, "op_domain", None) != DOMAIN:
        raise ValueError(f"custom op {op.name!r}: its reference class must be named {op.name!r} with op_domain {DOMAIN!r}")
    if op.name in CUSTOM_OPS and CUSTOM_OPS[op.name] is not op:
        raise ValueError(f"custom op {op.name!r} registered twice")
    CUSTOM_OPS[op.name] = op
    return op


def load_all() -> dict[str, CustomOp]:
    """Import every op package of this package (each registers its ops) and return the registry."""
    for module in pkgutil.iter_modules(__path__):
        if module.ispkg and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    return CUSTOM_OPS
