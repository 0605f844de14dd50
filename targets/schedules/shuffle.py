"""Channel shuffle, split and concat carried into channels-last (ShuffleNet).

ShuffleNet's channel shuffle of ``g`` groups is, in ONNX, three ops on an
NCHW tensor ``x`` of ``C`` channels:

    reshape(x, [N, g, C/g, H, W]) -> transpose(0, 2, 1, 3, 4) -> reshape(x.shape)

a permutation of the channel axis: output channel ``c' = i*g + j`` (``i <
C/g``, ``j < g``) is input channel ``p[c'] = j*(C/g) + i``. The rank-5 middle
is what the layout rules (NCHW <-> NHWC, 4-D) cannot carry: layout.py fences it
and the tensor goes NHWC -> NCHW -> shuffle -> NHWC around every block. Two
rewrites remove those layout changes:

1. ``channel_shuffle_as_take`` (before the layout pass): the three ops become
   one rank-4 ``take(x, p, axis=1)`` with the constant index ``p``, which the
   layout pass leaves in NCHW with a transpose on each side (no fence).
2. ``sink_transposes`` (after it): a transpose ``permute_dims(y, P)`` moves
   below the index ops that follow it, their axis mapped through ``P``:

       take(permute_dims(y, P), i, axis=a)            -> permute_dims(take(y, i, axis=P[a]), P)
       strided_slice(permute_dims(y, P), axes=[a])    -> permute_dims(strided_slice(y, axes=[P[a]]), P)
       concat([permute_dims(y_k, P)...], axis=a)      -> permute_dims(concat([y_k...], axis=P[a]), P)

   until it meets its inverse (NHWC -> NCHW followed by NCHW -> NHWC, in front
   of the next convolution), where both go (edgec/ops/transposes.py's
   ``cancel_transposes``). Each rule is exact for any tensor, not only a
   shuffle: an index op on the axis ``P[a]`` of ``y`` picks the same elements
   as on the axis ``a`` of ``permute_dims(y, P)``.

The shuffle, the split (strided_slice) and the concat of a ShuffleNetV2 block
then fuse into one channels-last kernel whose innermost axis is the channel,
which the generic rule vectorises; ``take`` on the last axis with the group
shuffle's index becomes reshape / transpose / reshape on that axis (integer
index arithmetic instead of a load of the index per element).
"""

from __future__ import annotations

import logging

import numpy as np

from edgec.core.fallbacks import FallbackLog
from edgec.targets.schedules.guard import describe_call

log = logging.getLogger(__name__)

RULE = "graph:channel-shuffle"
SHUFFLE_AXES = [0, 2, 1, 3, 4]


def shuffle_permutation(channels: int, groups: int) -> np.ndarray:
    """``p`` with ``shuffled[..., c', ...] = x[..., p[c'], ...]``: ``p[i*g + j] = j*(C/g) + i``."""
    return np.arange(channels).reshape(groups, channels // groups).T.reshape(-1)


def shuffle_groups(index: np.ndarray) -> int | None:
    """The ``g`` (1 < g < C) for which ``index`` is the group shuffle's permutation, else None."""
    channels = index.shape[0] if index.ndim == 1 else 0
    for groups in range(2, channels):
        if channels % groups == 0 and np.array_equal(index, shuffle_permutation(channels, groups)):
            return groups
    return None


def _ints(values) -> list[int] | None:
    from tvm import tirx

    if values is None or not all(isinstance(value, tirx.IntImm) for value in values):
        return None
    return [int(value) for value in values]


def channel_shuffle_as_take(fallbacks: FallbackLog | None = None):
    """Rewrite 1: reshape -> transpose(0, 2, 1, 3, 4) -> reshape of an NCHW tensor to ``take`` on axis 1."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    data = wildcard()
    split = is_op("relax.reshape")(data, wildcard())
    swapped = is_op("relax.permute_dims")(split)
    pattern = is_op("relax.reshape")(swapped, wildcard())
    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    def rewriter(expr, matches):
        try:
            return as_take(expr, matches)
        except Exception as error:  # noqa: BLE001 - unexpected shapes or attributes: keep the three ops
            fallbacks.add(describe_call(expr), RULE, error, "kept as reshape / transpose / reshape")
            return expr

    def as_take(expr, matches):
        source = _ints(getattr(matches[data].ty, "shape", None))
        middle = _ints(getattr(matches[split].ty, "shape", None))
        result = _ints(getattr(expr.ty, "shape", None))
        axes = matches[swapped].attrs.axes
        if source is None or middle is None or len(source) != 4 or result != source or axes is None:
            return expr
        batch, channels, height, width = source
        groups = middle[1]
        if [int(axis) for axis in axes] != SHUFFLE_AXES or groups in (0, 1, channels) or middle != [
            batch, groups, channels // groups, height, width
        ] or channels % groups:
            return expr
        log.debug("channel shuffle of %d channels in %d groups as take", channels, groups)
        index = relax.const(shuffle_permutation(channels, groups).astype("int64"), "int64")
        return relax.op.take(matches[data], index, axis=1)

    @relax.transform.function_pass(opt_level=0, name="EdgecChannelShuffleAsTake")
    def _pass(func, _mod, _ctx):
        return rewrite_call(pattern, rewriter, func)

    return _pass


def sink_transposes():
    """Rewrite 2: transposes moved below take / strided_slice / concat, then cancelled."""
    import tvm
    from tvm import relax

    from edgec.ops.transposes import cancel_transposes

    permute = tvm.ir.Op.get("relax.permute_dims")
    take = tvm.ir.Op.get("relax.take")
    strided_slice = tvm.ir.Op.get("relax.strided_slice")
    concat = tvm.ir.Op.get("relax.concat")

    @relax.expr_functor.mutator
    class _Sink(relax.PyExprMutator):
        def permuted(self, expr):
            """(source, axes) when ``expr`` is a var bound to a permute_dims with explicit axes."""
            bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
            if isinstance(bound, relax.Call) and bound.op == permute and bound.attrs.axes is not None:
                return bound.args[0], [int(axis) for axis in bound.attrs.axes]
            return None

        def last_axis_shuffle(self, call):
            """``take(y, p, axis=-1)`` with the group shuffle's ``p`` as reshape / transpose / reshape
            of the last axis (index arithmetic the kernel computes, fused with its neighbours)."""
            shape = _ints(getattr(call.args[0].ty, "shape", None))
            index = self.constant(call.args[1])
            if shape is None or index is None or int(call.attrs.axis) % len(shape) != len(shape) - 1:
                return call
            groups = shuffle_groups(index)
            if groups is None or index.shape[0] != shape[-1]:
                return call
            rank = len(shape)
            split = self.builder_.emit(relax.op.reshape(call.args[0], [*shape[:-1], groups, shape[-1] // groups]))
            swapped = self.builder_.emit(relax.op.permute_dims(split, [*range(rank - 1), rank, rank - 1]))
            return relax.op.reshape(swapped, shape)

        def constant(self, expr):
            bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
            return bound.value.numpy() if isinstance(bound, tvm.ir.expr.Constant) else None

        def emit_permuted(self, inner, axes):
            inner = inner if isinstance(inner, relax.Var) else self.builder_.emit(inner)
            return relax.op.permute_dims(inner, axes)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op == take:
                found = self.permuted(call.args[0])
                if found is not None:
                    source, axes = found
                    axis = axes[int(call.attrs.axis) % len(axes)]
                    inner = relax.op.take(source, call.args[1], axis, call.attrs.mode)
                    return self.emit_permuted(self.last_axis_shuffle(inner), axes)
                return self.last_axis_shuffle(call)
            elif call.op == strided_slice:
                found = self.permuted(call.args[0])
                if found is not None:
                    source, axes = found
                    slice_axes, begin, end, *strides = ([int(value.value) for value in arg.fields] for arg in call.args[1:])
                    inner = relax.op.strided_slice(
                        source, [axes[axis % len(axes)] for axis in slice_axes], begin, end,
                        strides[0] if strides else None, bool(call.attrs.assume_inbound),
                    )
                    return self.emit_permuted(inner, axes)
            elif call.op == concat and isinstance(call.args[0], relax.Tuple):
                found = [self.permuted(field) for field in call.args[0].fields]
                if found and all(item is not None and item[1] == found[0][1] for item in found):
                    axes = found[0][1]
                    axis = axes[int(call.attrs.axis) % len(axes)]
                    return self.emit_permuted(relax.op.concat([source for source, _ in found], axis), axes)
            return call

    @relax.transform.function_pass(opt_level=0, name="EdgecSinkTransposes")
    def _sink(func, mod, _ctx):
        return _Sink(mod).visit_expr(func)

    return tvm.transform.Sequential([_sink, relax.transform.CanonicalizeBindings(), cancel_transposes()])
