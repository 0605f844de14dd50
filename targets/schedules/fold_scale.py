"""Graph rewrite (graph.py step 5a): a per-output-channel scale right after a convolution is
folded into its constant weights:

    multiply(conv2d(x, W), s)  ->  conv2d(x, W * s)      W HWIO, s[o] per output channel

Why: step 3 writes an inference batch norm as ``x * s + t``; unfolded, the scale is one more
vector multiply per output vector in every convolution's epilogue (a user who compiles without
``-p fold-bn`` pays it in every layer: MobileNetV2 on cortex-a53, 104,774,401 -> 100,931,984
instructions per inference with the scale in the weights; on x86 the difference was within the
machine's noise). The shift stays an addition (the epilogue's
bias). In HWIO the output channel is the last axis for every group count, depthwise included,
so ``W * s`` broadcasts ``s`` over it. Only the rounding changes (``(x . W) s`` becomes
``x . (W s)``).

Left alone: a scale that is not a constant of one value per output channel (``[F]`` or
``[1, 1, 1, F]``), a convolution that is not NHWC/HWIO or whose weights are not a float32
constant, and one whose output something else reads too (it would be computed twice).
"""

from __future__ import annotations

import logging

import numpy as np

from edgec.core.fallbacks import FallbackLog
from edgec.targets.schedules.guard import describe_call

log = logging.getLogger(__name__)

RULE = "graph:fold-scale"


def folded_weights(kernel: np.ndarray, scale: np.ndarray) -> np.ndarray | None:
    """``kernel`` (HWIO) times ``scale`` per output channel, or None when ``scale`` is not one
    value per output channel (``[F]`` or ``[1, 1, 1, F]``)."""
    filters = kernel.shape[-1]
    if scale.shape not in ((filters,), (1, 1, 1, filters)) or kernel.dtype != np.float32 or scale.dtype != np.float32:
        return None
    return (kernel * scale.reshape(filters)).astype(np.float32)


def fold_scale_into_weights(fallbacks: FallbackLog | None = None):
    """A function pass doing the rewrite of the module docstring."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    data, weight, scale = wildcard(), is_const(), is_const()
    conv = is_op("relax.nn.conv2d")(data, weight)
    pattern = is_op("relax.multiply")(conv, scale)
    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    @relax.transform.function_pass(opt_level=0, name="EdgecFoldScale")
    def _pass(func, _mod, _ctx):
        readers = _readers(func)

        def rewriter(expr, matches):
            try:
                return folded(expr, matches)
            except Exception as error:  # noqa: BLE001 - keep the multiply
                fallbacks.add(describe_call(matches[pattern]), RULE, error, "the scale left in the epilogue")
                return expr

        def folded(expr, matches):  # expr: the multiply, or a variable bound to it
            call = matches[conv]
            attrs = call.attrs
            if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "HWIO", "NHWC"):
                return expr
            if readers.get(_bound_var(matches[pattern].args[0]), 0) > 1:
                return expr  # the convolution's output is read elsewhere too
            kernel = folded_weights(matches[weight].value.numpy(), matches[scale].value.numpy())
            if kernel is None:
                return expr
            return relax.Call(call.op, [matches[data], relax.const(kernel, "float32")], attrs)

        return rewrite_call(pattern, rewriter, func)

    return _pass


def _bound_var(expr):
    from tvm import relax

    return expr if isinstance(expr, relax.Var) else None


def _readers(func) -> dict:
    """How many bindings (and the function's result) read each variable of ``func``."""
    from tvm import relax

    counts: dict = {}

    def note(node):
        if isinstance(node, relax.Var):
            counts[node] = counts.get(node, 0) + 1

    for block in func.body.blocks:
        for binding in block.bindings:
            relax.analysis.post_order_visit(binding.value, note)
    relax.analysis.post_order_visit(func.body.body, note)
    return counts
