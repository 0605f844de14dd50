"""Graph rewrite: eligible 3x3 convolutions become Winograd convolutions (winograd.py).

    conv2d(x, w)  ->  conv2d_winograd_output(winograd_gemm(winograd_input(x), U))

for a Relax ``conv2d`` in edgec's channels-last layout (NHWC data, HWIO constant
weights), 3x3, stride 1, dilation 1, groups 1, float32, whose shapes pass the
``WinogradPolicy``. ``U`` (the transformed weights) is computed here, in
NumPy, once: it is a constant of the built module. Runs after the layout pass
(the kernels are written for NHWC) and before LegalizeOps; FuseOps later fuses
``conv2d_winograd_output`` with the convolution's epilogue.

A convolution the policy turns down stays a direct convolution (logged with
``-vv``, the reason named); one the rewrite fails on is recorded as a fallback
(``graph:winograd``) and also stays.
"""

from __future__ import annotations

import dataclasses
import logging

from edgec.core.fallbacks import FallbackLog
from edgec.targets.schedules.guard import describe_call, not_channels_last_conv

log = logging.getLogger(__name__)

RULE = "graph:winograd"
OPAQUE = 8  # relax's OpPatternKind kOpaque: FuseOps fuses nothing with it


@dataclasses.dataclass(frozen=True)
class WinogradPolicy:
    """Which convolutions become Winograd ones, and with which output tile.

    ``tiles``: the output tiles ``m`` of F(m x m, 3x3) to try, largest first
    (fewest multiplies). A convolution takes the first ``m`` that gives it at
    least ``min_tiles`` output tiles (the GEMM's rows: with fewer, each of the
    transformed weights, ``(m + 2)^2 / 9`` times the direct convolution's, is
    read for too little work), and needs at least ``min_channels`` input and
    output channels (the transforms cost about ``alpha^2 (C + F)`` per tile
    against ``alpha^2 C F`` for the GEMM). ``min_tiles`` None: the target's
    (``TargetPreset.winograd_min_tiles``: 49 on x86, where single-layer timings
    on a loaded 2-core machine had F(4x4) slower than F(2x2) at 14x14 and neither
    clearly faster than direct at 7x7 (noisy: re-measure with bench/winograd.py
    on a quiet machine); 16 on aarch64, where both save instructions, README).
    """

    tiles: tuple[int, ...] = (4, 2)
    min_channels: int = 16
    min_tiles: int | None = None

    def for_target(self, min_tiles: int) -> WinogradPolicy:
        """This policy with ``min_tiles`` filled in where it was left to the target."""
        return self if self.min_tiles is not None else dataclasses.replace(self, min_tiles=min_tiles)

    def choose(self, batch: int, out_h: int, out_w: int, channels: int, filters: int) -> tuple[int | None, str]:
        """(output tile m, why) for a convolution of these shapes; m None: stays direct."""
        if self.min_tiles is None:
            raise ValueError("WinogradPolicy.min_tiles is the target's: call for_target first")
        if min(channels, filters) < self.min_channels:
            return None, f"{channels} -> {filters} channels: fewer than {self.min_channels}"
        for m in self.tiles:
            tiles = batch * -(-out_h // m) * -(-out_w // m)
            if tiles >= self.min_tiles:
                return m, f"{tiles} output tiles of {m}x{m}"
        return None, f"fewer than {self.min_tiles} output tiles of {min(self.tiles)}x{min(self.tiles)}"


DEFAULT_POLICY = WinogradPolicy()


def ineligible(call, weight) -> str | None:
    """Why the Relax ``call`` cannot be a Winograd convolution (whatever the policy), or None;
    ``weight`` is its weight as a NumPy array (None when not a constant)."""
    reason = not_channels_last_conv(call, weight)
    if reason is not None:
        return reason
    attrs = call.attrs
    if weight.shape[:2] != (3, 3):
        return f"kernel {weight.shape[0]}x{weight.shape[1]}, not 3x3"
    if [int(s) for s in attrs.strides] != [1, 1] or [int(d) for d in attrs.dilation] != [1, 1]:
        return f"strides {list(attrs.strides)}, dilation {list(attrs.dilation)}: not 1"
    dtypes = {str(call.args[0].ty.dtype), str(weight.dtype), str(call.ty.dtype)}
    if dtypes != {"float32"}:
        return f"dtypes {sorted(dtypes)}, not float32"
    if any(not hasattr(dim, "value") for dim in call.args[0].ty.shape):
        return "the input shape is not static"
    return None


def winograd_conv2d(policy: WinogradPolicy, fallbacks: FallbackLog | None = None):
    """A module pass rewriting the convolutions ``policy`` accepts (see the module docstring)."""
    import tvm
    from tvm import relax

    from edgec.targets.schedules import winograd_kernels as kernels
    from edgec.targets.schedules.winograd import transform_weights, winograd_matrices

    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.nn.conv2d":
                return call
            weight = self._constant(call.args[1])
            m, reason = None, ineligible(call, weight)
            if reason is None:
                batch, out_h, out_w, filters = (int(dim) for dim in call.ty.shape)
                m, reason = policy.choose(batch, out_h, out_w, int(weight.shape[2]), filters)
            if m is None:
                log.debug("%s: direct convolution (%s)", describe_call(call), reason)
                return call
            log.debug("%s: Winograd F(%dx%d, 3x3) (%s)", describe_call(call), m, m, reason)
            try:
                return self._winograd(call, weight, winograd_matrices(m))
            except Exception as error:  # noqa: BLE001 - keep the direct convolution
                fallbacks.add(describe_call(call), RULE, error, "kept as a direct convolution")
                return call

        def _constant(self, expr):
            if isinstance(expr, relax.Var):
                expr = self.lookup_binding(expr)
            return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None

        def _winograd(self, call, weight, mats):
            padding = tuple(int(p) for p in call.attrs.padding)
            batch, out_h, out_w, _ = (int(dim) for dim in call.ty.shape)
            out_size = (out_h, out_w)
            builder = self.builder_
            transform = builder.call_te(lambda data: kernels.input_transform(data, mats, padding, out_size),
                                        call.args[0], primfunc_name_hint=kernels.INPUT_KERNEL)
            self.input_kernels.append(transform.args[0])
            transformed = builder.emit(transform)
            weights = relax.const(transform_weights(weight, mats.m), "float32")
            products = builder.emit(builder.call_te(kernels.gemm, transformed, weights, primfunc_name_hint=kernels.GEMM_KERNEL))
            return builder.call_te(lambda gemm: kernels.output_transform(gemm, mats, batch, out_size), products,
                                   primfunc_name_hint=kernels.OUTPUT_KERNEL)

    @tvm.transform.module_pass(opt_level=0, name="EdgecWinogradConv2d")
    def _pass(mod, _ctx):
        rewriter = _Rewriter(mod)
        rewriter.input_kernels = []
        bodies = {gvar: rewriter.visit_expr(func) for gvar, func in mod.functions_items() if isinstance(func, relax.Function)}
        rewritten = rewriter.builder_.get()
        for gvar, body in bodies.items():
            rewritten[gvar] = body
        for gvar in rewriter.input_kernels:
            # FuseOps would fuse it (injective) into the output transform before it: one kernel
            # no rule schedules well. Opaque, it stays a kernel of its own.
            rewritten[gvar] = rewritten[gvar].with_attr("op_pattern", OPAQUE)
        return rewritten

    return _pass
