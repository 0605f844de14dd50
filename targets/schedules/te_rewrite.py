"""What the graph rewrites that replace a Relax op by edgec's own TE kernels share
(winograd_graph.py, conv2d_int8.py): a ``relax.PyExprMutator`` emits the kernels with
``self.builder_.call_te`` and notes the fusion pattern each one gets; ``rewrite_module`` runs it
over every Relax function and returns the builder's module (which holds the new PrimFuncs)."""

from __future__ import annotations


def bound_constant(mutator, expr):
    """The NumPy value of ``expr`` when it is a constant or a variable bound to one, else None."""
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Var):
        expr = mutator.lookup_binding(expr)
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def rewrite_module(mod, rewriter_class):
    """``mod`` with every Relax function rewritten by a fresh ``rewriter_class(mod)``; each
    ``(GlobalVar, pattern)`` the rewriter appended to its ``patterns`` list marks that kernel with
    relax's ``op_pattern`` (e.g. 4 kOutEWiseFusable: FuseOps fuses the epilogue after it, as
    after a conv2d; 8 kOpaque: fused with nothing). Returns (module, rewriter)."""
    from tvm import relax

    rewriter = rewriter_class(mod)
    rewriter.patterns = []
    bodies = {gvar: rewriter.visit_expr(func) for gvar, func in mod.functions_items() if isinstance(func, relax.Function)}
    rewritten = rewriter.builder_.get()
    for gvar, body in bodies.items():
        rewritten[gvar] = body
    for gvar, pattern in rewriter.patterns:
        rewritten[gvar] = rewritten[gvar].with_attr("op_pattern", pattern)
    return rewritten, rewriter


def conv2d_rewriter(decide, rewrite, rule: str, fallbacks, instead: str):
    """``call_rewriter`` for ``relax.nn.conv2d`` calls."""
    return call_rewriter("relax.nn.conv2d", decide, rewrite, rule, fallbacks, instead)


def call_rewriter(op_name: str, decide, rewrite, rule: str, fallbacks, instead: str):
    """A ``relax.PyExprMutator`` class for ``rewrite_module`` that rewrites calls of ``op_name``
    whose second argument is the weights: ``decide(call, weight)`` (``weight`` a NumPy array, or
    None when not a constant) gives a choice, None to leave the call alone (it logs why);
    ``rewrite(mutator, call, weight, choice)`` gives the new expression. A rewrite that raises
    keeps the call and is recorded in ``fallbacks`` under ``rule`` (``instead``: what it stays)."""
    from tvm import relax

    from edgec.targets.schedules.guard import describe_call

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != op_name:
                return call
            weight = bound_constant(self, call.args[1])
            choice = decide(call, weight)
            if choice is None:
                return call
            try:
                return rewrite(self, call, weight, choice)
            except Exception as error:  # noqa: BLE001 - keep the call
                fallbacks.add(describe_call(call), rule, error, instead)
                return call

    return _Rewriter


def explained(choose, logger):
    """``decide(call, weight)`` for ``call_rewriter`` from ``choose(call, weight) -> (choice, why)``,
    logging why at debug level."""
    from edgec.targets.schedules.guard import describe_call

    def decide(call, weight):
        choice, reason = choose(call, weight)
        logger.debug("%s: %s", describe_call(call), reason)
        return choice

    return decide


def not_dense_nhwc(call, weight) -> str | None:
    """Why the Relax conv2d ``call`` is not a dense channels-last convolution on constant weights
    (``weight``: NumPy, None when not a constant), or None: what the rewrites above start from."""
    attrs = call.attrs
    if weight is None:
        return "the weights are not a constant"
    layouts = (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)
    if layouts != ("NHWC", "HWIO", "NHWC"):
        return f"layouts {layouts}, not NHWC/HWIO"
    if int(attrs.groups) != 1:
        return f"groups={int(attrs.groups)}"
    return None
