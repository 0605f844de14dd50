"""Helpers for custom-op lowerings: constants out of Relax exprs, and emitting a
pre-scheduled TIR kernel as an opaque ``call_tir`` (so TVM's fusion and the
default schedule rules leave it alone)."""

from __future__ import annotations

import numpy as np

from edgec.errors import BuildError

# TVM 0.27 keeps a "global" CPU buffer of under this many bytes on the stack, where LLVM
# keeps it in registers; a larger one, or any "local" one, becomes a
# TVMBackendAllocWorkspace call (a heap allocation) per iteration of the parallel loop,
# and a register tile is then zeroed with a memset, spilled after its reduction and
# reloaded for its epilogue. (The allocation annotation "disable_lower_builtin" would keep
# any size on the stack, but StorageRewrite drops it.) Kernels size their accumulator
# tiles under it.
STACK_TILE_BYTES = 1024


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


CUSTOM_KERNEL_ATTR = "edgec.custom_op_kernel"


def emit_kernel(bb, prim_func, name: str, args, out_ty):
    """Add ``prim_func`` (already scheduled) to the module and call it.

    The kernel is marked scheduled (default schedule rules skip it), opaque
    (FuseOps does not merge it with neighbours, which would drop its schedule)
    and as a custom-op kernel (the manifest's schedule column says "custom-op").
    """
    from tvm import relax

    prim_func = (
        prim_func.without_attr("global_symbol")
        .with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", 8)
        .with_attr(CUSTOM_KERNEL_ATTR, True)
    )
    gvar = bb.add_func(prim_func, name)
    return relax.call_tir(gvar, args, out_ty)


def cancel_transposes():
    """A Relax module pass: ``permute_dims`` of a ``permute_dims`` becomes one (or none), an
    identity ``permute_dims`` disappears, and an element-wise op of operands permuted alike
    becomes the permute of the op (so the permute can meet its inverse further on).

    Custom-op kernels are written channels-last and their lowerings wrap them
    in NCHW <-> NHWC transposes (the ONNX graph is NCHW). Once the CPU layout
    pass has made the graph channels-last, each wrapper meets the inverse
    transpose the layout pass put next to it, or becomes an identity: this
    pass removes both, so a custom op costs no layout change there. A
    residual ``Add`` of two custom-op outputs (both wrapped back to NCHW) is
    the case the third rule is for.
    """
    import tvm
    from tvm import relax

    permute = tvm.ir.Op.get("relax.permute_dims")
    elementwise = {
        tvm.ir.Op.get(f"relax.{name}")
        for name in ("add", "subtract", "multiply", "divide", "maximum", "minimum", "nn.relu", "clip")
    }

    def axes_of(call) -> list[int] | None:
        rank = len(call.ty.shape) if getattr(call.ty, "shape", None) is not None else None
        if call.attrs.axes is None:
            return None if rank is None else list(range(rank))[::-1]
        return [int(axis) for axis in call.attrs.axes]

    @relax.expr_functor.mutator
    class _Cancel(relax.PyExprMutator):
        def permuted(self, expr):
            """(source, axes) when ``expr`` is a var bound to a permute_dims, else None."""
            bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
            if isinstance(bound, relax.Call) and bound.op == permute and axes_of(bound) is not None:
                return bound.args[0], axes_of(bound)
            return None

        def sink(self, call):
            """op(permute(a, p), permute(b, p), scalars...) -> permute(op(a, b, scalars...), p)."""
            tensors = [arg for arg in call.args if isinstance(getattr(arg, "ty", None), relax.TensorType)]
            sources, axes = [], None
            for arg in call.args:
                if arg not in tensors or (arg.ty.shape is not None and len(arg.ty.shape) == 0):
                    sources.append(arg)  # a scalar or an attribute-like argument: layout-free
                    continue
                found = self.permuted(arg)
                if found is None or (axes is not None and found[1] != axes):
                    return call
                sources.append(found[0])
                axes = found[1]
            if axes is None:
                return call
            inner = self.builder_.emit(relax.Call(call.op, sources, call.attrs, call.ty_args))
            return relax.op.permute_dims(inner, axes)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op in elementwise:
                return self.sink(call)
            if call.op != permute:
                return call
            axes, source = axes_of(call), call.args[0]
            if axes is None:
                return call
            inner = self.lookup_binding(source) if isinstance(source, relax.Var) else None
            if isinstance(inner, relax.Call) and inner.op == permute and axes_of(inner) is not None:
                inner_axes = axes_of(inner)
                axes, source = [inner_axes[axis] for axis in axes], inner.args[0]
            if axes == list(range(len(axes))):
                return source
            return call if source.same_as(call.args[0]) else relax.op.permute_dims(source, axes)

    @tvm.transform.module_pass(opt_level=0, name="EdgecCancelTransposes")
    def _pass(mod, _ctx):
        mutator = _Cancel(mod)
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gvar] = mutator.visit_expr(func)
        mod = relax.transform.CanonicalizeBindings()(mod)
        return relax.transform.DeadCodeElimination()(mod)

    return _pass
