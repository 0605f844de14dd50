"""Channels-last layout (TVM's ConvertLayout) with a per-op fallback.

ConvertLayout rewrites a whole function in one go: convolutions take the
desired layouts, every op with a layout rule (``FRelaxInferLayout``) follows
its inputs, and transposes are inserted where a follower has no rule. One op
whose rule cannot take the layouts it gets stops the pass for the whole model.
Seen on the onnx wheel's zoo models:

    relax.stack of NHWC tensors (ONNX Sum of 3+ inputs)   Invalid SLayout: can't find S in
                                                          source layout ABCDE; Index -1 out of bounds 5
    relax.nn.dropout (a tuple output)                     Expected nested to match tuple

Such an op is **fenced**: it moves into a private function of its own, called
where it was. ConvertLayout gives a call of a function its default policy
(arguments transposed back to the model's own layout, NCHW, the result taken
as NCHW) and does not enter the function's body (no dataflow block), so the op
is computed as TVM would compute it without edgec while everything around it
is converted. Which ops:

1. before the pass, ops the layout rules are not written for: a result of
   higher rank than 4 (NCHW <-> NHWC is a 4-D rule) made from a 4-D tensor;
2. then, while ConvertLayout fails, the op it was converting when it failed
   (the last call its layout callback saw), one at a time, at most
   ``MAX_FENCES`` times.

Each fenced op is recorded as a fallback (``graph:layout``, the op and its
shapes). After the pass each fence call becomes its op again. If the failure
cannot be pinned on an op, the module stays as it was (NCHW) and the whole
pass is recorded as a fallback (kernel ``*``).
"""

from __future__ import annotations

import logging

from edgec.core.fallbacks import ALL_KERNELS, FallbackLog
from edgec.targets.schedules.guard import describe_call

log = logging.getLogger(__name__)

FENCE = "edgec_layout_fence"  # name of the private functions holding fenced ops, gone after the pass
MAX_FENCES = 64
LAYOUT_RANK = 4  # the layout rules map NCHW <-> NHWC


def convert_layout(desired_layouts: dict[str, list[str]], fallbacks: FallbackLog | None = None):
    """A module pass: ConvertLayout(``desired_layouts``), fencing the ops it cannot convert."""
    import tvm
    from tvm import relax

    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    @tvm.transform.module_pass(opt_level=0, name="EdgecConvertLayout")
    def _pass(mod, _ctx):
        calls = {gvar.name_hint: _calls(func) for gvar, func in _relax_functions(mod)}
        reason = "its result has rank > 4 and an argument rank 4: the layout rules are 4-D"
        fenced = {place: reason for place in _rank_changing(calls)}  # (function, position) -> why
        while True:
            candidate = _fence(mod, [calls[name][index] for name, index in fenced]) if fenced else mod
            seen: list = []

            def layout_of(call, seen=seen):
                seen.append(call)
                return desired_layouts

            try:
                converted = relax.transform.ConvertLayout(desired_layouts, layout_of)(candidate)
            except Exception as error:  # noqa: BLE001 - find the op it failed on, fence it, retry
                place = _place_of(seen[-1], candidate) if seen else None
                if place is None or place in fenced or len(fenced) >= MAX_FENCES:
                    fallbacks.add(ALL_KERNELS, "graph:layout", error, "the whole model stays in its own layout")
                    return mod
                log.debug("ConvertLayout failed on %s: fenced", describe_call(calls[place[0]][place[1]]))
                fenced[place] = error
                continue
            for (name, index), why in fenced.items():
                fallbacks.add(describe_call(calls[name][index]), "graph:layout", why, "computed in the model's own layout")
            return relax.transform.CanonicalizeBindings()(_unfence(converted))

    return _pass


def _rank_changing(calls: dict[str, list]) -> list[tuple[str, int]]:
    """Places of the calls whose tensor result has rank > 4 while a tensor argument has rank 4."""
    places = []
    for name, function_calls in calls.items():
        for index, call in enumerate(function_calls):
            out_rank = _rank(call.ty)
            if out_rank is not None and out_rank > LAYOUT_RANK and LAYOUT_RANK in map(_rank, _argument_types(call)):
                places.append((name, index))
    return places


def _argument_types(call) -> list:
    from tvm import relax

    types = []
    for arg in call.args:
        if isinstance(arg, relax.Tuple):
            types.extend(field.ty for field in arg.fields)
        elif hasattr(arg, "ty"):
            types.append(arg.ty)
    return types


def _rank(ty) -> int | None:
    from tvm import relax

    if not isinstance(ty, relax.TensorType) or ty.ndim < 0:
        return None
    return int(ty.ndim)


def _relax_functions(mod) -> list:
    from tvm import relax

    return [(gvar, func) for gvar, func in mod.functions_items() if isinstance(func, relax.Function)]


def _calls(func) -> list:
    """The op calls bound in ``func``'s dataflow blocks, in order, a fence standing where the op
    it holds stood: a position names the same op in the module and in its fenced copy."""
    import tvm
    from tvm import relax

    calls = []
    for block in getattr(func.body, "blocks", []):
        if not isinstance(block, relax.DataflowBlock):
            continue
        for binding in block.bindings:
            value = getattr(binding, "value", None)
            if isinstance(value, relax.Call) and (isinstance(value.op, tvm.ir.Op) or _is_fence(value)):
                calls.append(value)
    return calls


def _place_of(call, mod) -> tuple[str, int] | None:
    """(function name, position) of ``call`` among ``mod``'s op calls, or None."""
    for gvar, func in _relax_functions(mod):
        for index, candidate in enumerate(_calls(func)):
            if candidate.same_as(call):
                return gvar.name_hint, index
    return None


def _is_fence(expr) -> bool:
    from tvm import relax

    return isinstance(expr, relax.Call) and isinstance(expr.op, relax.GlobalVar) and expr.op.name_hint.startswith(FENCE)


def _fence(mod, targets: list):
    """A copy of ``mod`` in which each call of ``targets`` is a call of a private function
    (one binding, no dataflow block) that makes it."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Fence(relax.PyExprMutator):
        def visit_call_(self, call):
            new = super().visit_call_(call)
            if not any(call.same_as(target) for target in targets):
                return new
            params, arguments, inner = [], [], []
            for position, arg in enumerate(new.args):
                if isinstance(arg, (relax.Var, relax.Tuple)):
                    param = relax.Var(f"arg{position}", arg.ty)
                    params.append(param)
                    arguments.append(arg)
                    inner.append(param)
                else:
                    inner.append(arg)  # constants and attribute-like arguments stay inside
            builder = relax.BlockBuilder()
            with builder.function(FENCE, params, private=True):
                builder.emit_func_output(builder.emit(relax.Call(new.op, inner, new.attrs, new.ty_args)))
            return relax.Call(self.builder_.add_func(builder.get()[FENCE], FENCE), arguments)

    mutator = _Fence(mod.clone())
    bodies = {gvar: mutator.visit_expr(func) for gvar, func in _relax_functions(mod)}
    fenced = mutator.builder_.get()
    for gvar, body in bodies.items():
        fenced[gvar] = body
    return fenced


def _unfence(mod):
    """Each fence call back to the op it holds; the fence functions dropped."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Unfence(relax.PyExprMutator):
        def visit_call_(self, call):
            new = super().visit_call_(call)
            if not _is_fence(new):
                return new
            function = mod[new.op]
            inner = function.body.blocks[0].bindings[0].value
            arguments = dict(zip(function.params, new.args, strict=True))
            args = [next((value for param, value in arguments.items() if param.same_as(arg)), arg) for arg in inner.args]
            return relax.Call(inner.op, args, inner.attrs, inner.ty_args)

    mutator = _Unfence(mod)
    unfenced = {gvar: mutator.visit_expr(func) for gvar, func in _relax_functions(mod) if not gvar.name_hint.startswith(FENCE)}
    for gvar, func in _relax_functions(mod):
        if gvar.name_hint.startswith(FENCE):
            del mod[gvar]
    for gvar, func in unfenced.items():
        mod[gvar] = func
    return mod
