"""Helpers for custom-op lowerings: constants out of Relax exprs, and emitting a
pre-scheduled TIR kernel as an opaque ``call_tir`` (so TVM's fusion and the
default schedule rules leave it alone)."""

from __future__ import annotations

import numpy as np

from edgec.errors import BuildError


def constant(expr, what: str) -> np.ndarray:
    """The NumPy value of a Relax constant input (initializer), or a BuildError naming it."""
    import tvm

    if not isinstance(expr, tvm.ir.expr.Constant):
        raise BuildError(f"{what} must be a constant initializer, got a computed value")
    return expr.value.numpy()


def tensor_type(expr) -> tuple[list[int], str]:
    """Static shape and dtype of a Relax tensor expr (TVM 0.27 calls struct info ``ty``)."""
    ty = expr.ty
    return [int(dim) for dim in ty.shape], str(ty.dtype)


def emit_kernel(bb, prim_func, name: str, args, out_ty):
    """Add ``prim_func`` (already scheduled) to the module and call it.

    The kernel is marked scheduled (default schedule rules skip it) and opaque
    (FuseOps does not merge it with neighbours, which would drop its schedule).
    """
    from tvm import relax

    prim_func = prim_func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
    gvar = bb.add_func(prim_func, name)
    return relax.call_tir(gvar, args, out_ty)
