"""A Relax module pass that removes the layout changes custom ops would cost: their
lowerings wrap channels-last kernels in NCHW <-> NHWC transposes."""

from __future__ import annotations

NHWC_TO_NCHW = [0, 3, 1, 2]


def cancel_transposes():
    """A Relax module pass: ``permute_dims`` of a ``permute_dims`` becomes one (or none), an
    identity ``permute_dims`` disappears, an element-wise op of operands permuted alike
    becomes the permute of the op, and an NCHW 2-D pooling of an NHWC tensor permuted to
    NCHW becomes the NHWC pooling, permuted (so the permute can meet its inverse further on).

    Custom-op kernels are written channels-last and their lowerings wrap them
    in NCHW <-> NHWC transposes (the ONNX graph is NCHW). Once the CPU layout
    pass has made the graph channels-last, each wrapper meets the inverse
    transpose the layout pass put next to it, or becomes an identity: this
    pass removes both, so a custom op costs no layout change there. A
    residual ``Add`` of two custom-op outputs (both wrapped back to NCHW) is
    the case the third rule is for. The fourth is for a region with no dense
    convolution, which the layout pass leaves NCHW (it starts from convolutions,
    and TVM's pooling layout rule follows its input and refuses a desired
    layout): ResNet-18 pruned 1xN everywhere ran its stem's max pool in NCHW
    (1.08 ms, against 0.07 in NHWC) between an NHWC -> NCHW transpose of
    112x112x64 (0.85 ms) and the transposes back in front of each block.
    """
    import tvm
    from tvm import relax

    permute = tvm.ir.Op.get("relax.permute_dims")
    elementwise = {
        tvm.ir.Op.get(f"relax.{name}")
        for name in ("add", "subtract", "multiply", "divide", "maximum", "minimum", "nn.relu", "clip")
    }

    def windowed(pool):
        def rebuild(data, attrs):
            return pool(data, attrs.pool_size, attrs.strides, attrs.padding, attrs.dilation, attrs.ceil_mode,
                        attrs.count_include_pad, "NHWC", "NHWC")  # fmt: skip

        return rebuild

    # NCHW pooling op -> its NHWC call on the same attributes
    pools = {
        tvm.ir.Op.get("relax.nn.max_pool2d"): windowed(relax.op.nn.max_pool2d),
        tvm.ir.Op.get("relax.nn.avg_pool2d"): windowed(relax.op.nn.avg_pool2d),
        tvm.ir.Op.get("relax.nn.adaptive_avg_pool2d"): lambda data, attrs: relax.op.nn.adaptive_avg_pool2d(
            data, attrs.output_size, "NHWC", "NHWC"
        ),
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

        def pool_channels_last(self, call):
            """pool(permute(y, NHWC -> NCHW)) in NCHW -> permute(pool(y) in NHWC, NHWC -> NCHW); any
            other pooling (its input not so permuted, another layout) is left as it is. The permute
            moves after the pool even when no inverse follows it: a transpose of the pooled (smaller
            or equal) tensor instead of its input."""
            found = self.permuted(call.args[0])
            if found is None or found[1] != NHWC_TO_NCHW or (call.attrs.layout, call.attrs.out_layout) != ("NCHW", "NCHW"):
                return call
            inner = self.builder_.emit(pools[call.op](found[0], call.attrs))
            return relax.op.permute_dims(inner, NHWC_TO_NCHW)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op in elementwise:
                return self.sink(call)
            if call.op in pools:
                return self.pool_channels_last(call)
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

    @relax.transform.function_pass(opt_level=0, name="EdgecCancelTransposes")
    def _cancel(func, mod, _ctx):
        return _Cancel(mod).visit_expr(func)

    return tvm.transform.Sequential(
        [_cancel, relax.transform.CanonicalizeBindings(), relax.transform.DeadCodeElimination()]
    )
