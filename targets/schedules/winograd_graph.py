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
from edgec.targets.schedules.guard import describe_call
from edgec.targets.schedules.te_rewrite import conv2d_rewriter, not_dense_nhwc, rewrite_module

log = logging.getLogger(__name__)

RULE = "graph:winograd"
OPAQUE = 8  # relax's OpPatternKind kOpaque: FuseOps fuses nothing with it


@dataclasses.dataclass(frozen=True)
class WinogradPolicy:
    """Which convolutions become Winograd ones, and with which output tile.

    ``tiles``: the output tiles ``m`` of F(m x m, 3x3) to try. A convolution needs
    at least ``min_channels`` input and output channels (the transforms cost about
    ``alpha^2 (C + F)`` per tile against ``alpha^2 C F`` for the GEMM) and an ``m``
    that gives it at least ``min_tiles`` output tiles (the GEMM's rows: with fewer,
    each of the transformed weights, ``(m + 2)^2 / 9`` times the direct
    convolution's, is read for too little work). Then:

    - ``transform_cost`` None: the first such ``m`` (list the largest first: fewest
      multiplies per output).
    - ``transform_cost`` set: the ``m`` of the smallest ``estimated_cost``, the GEMM's
      multiply-adds plus ``transform_cost`` multiply-adds per term of the separable
      transforms and channel, and direct convolution (``9 C F`` per output) when
      that is cheaper still. A partial last tile costs a whole one: at 7x7, F(4x4)'s
      4 tiles (36 x 4 products per filter and channel) beat F(2x2)'s 16 (16 x 16).
      ``density``, the kept fraction of a block-sparse weight (winograd_sparse.py), scales
      the GEMM's and the direct convolution's multiply-adds, not the transforms'.

    None in ``tiles``, ``min_tiles`` or ``transform_cost`` (the defaults): the target's
    (``TargetPreset.winograd_*``: x86 F(4x4) then F(2x2) from 49 tiles, first fit,
    where single-layer timings on a loaded 2-core machine had F(4x4) slower than
    F(2x2) at 14x14 and neither clearly faster than direct at 7x7 (noisy: re-measure
    with bench/winograd.py on a quiet machine); aarch64 the cheapest of F(2x2) to
    F(6x6) by instruction counts, README).
    """

    tiles: tuple[int, ...] | None = None
    min_channels: int = 16
    min_tiles: int | None = None
    transform_cost: float | None = None

    def for_target(self, min_tiles: int, tiles: tuple[int, ...] = (4, 2), transform_cost: float | None = None) -> WinogradPolicy:
        """This policy with what was left to the target filled in (``transform_cost`` only
        when ``tiles`` was left too: explicit tiles keep their own choice rule)."""
        if self.tiles is None:
            return dataclasses.replace(self, tiles=tuple(tiles), transform_cost=self.transform_cost or transform_cost,
                                       min_tiles=self.min_tiles if self.min_tiles is not None else min_tiles)
        return self if self.min_tiles is not None else dataclasses.replace(self, min_tiles=min_tiles)

    def estimated_cost(self, m: int, batch: int, out_h: int, out_w: int, channels: int, filters: int,
                       density: float = 1.0) -> float:
        """Multiply-adds of F(m x m, 3x3) on these shapes, transform terms weighted by ``transform_cost``
        (the GEMM's scaled by ``density``, the weights' kept fraction)."""
        from edgec.targets.schedules.winograd import transform_terms

        alpha = m + 2
        tiles = batch * -(-out_h // m) * -(-out_w // m)
        input_terms, output_terms = transform_terms(m)
        return tiles * (alpha * alpha * channels * filters * density + (self.transform_cost or 0) * (input_terms * channels + output_terms * filters))

    def choose(self, batch: int, out_h: int, out_w: int, channels: int, filters: int,
               density: float = 1.0) -> tuple[int | None, str]:
        """(output tile m, why) for a convolution of these shapes (``density``: the kept fraction of
        its weights); m None: stays direct."""
        if self.min_tiles is None or self.tiles is None:
            raise ValueError("WinogradPolicy.tiles and .min_tiles are the target's: call for_target first")
        if min(channels, filters) < self.min_channels:
            return None, f"{channels} -> {filters} channels: fewer than {self.min_channels}"
        enough = [m for m in self.tiles if batch * -(-out_h // m) * -(-out_w // m) >= self.min_tiles]
        if not enough:
            return None, f"fewer than {self.min_tiles} output tiles of {min(self.tiles)}x{min(self.tiles)}"
        if self.transform_cost is None:
            m = enough[0]
            return m, f"{batch * -(-out_h // m) * -(-out_w // m)} output tiles of {m}x{m}"
        costs = {m: self.estimated_cost(m, batch, out_h, out_w, channels, filters, density) for m in enough}
        m = min(costs, key=lambda each: (costs[each], -each))
        direct = 9 * batch * out_h * out_w * channels * filters * density
        if costs[m] >= direct:
            return None, f"F({m}x{m}) estimated at {costs[m]:.3g} multiply-adds, direct {direct:.3g}"
        return m, f"estimated {costs[m]:.3g} multiply-adds, the fewest of " + ", ".join(f"F({k}x{k}) {v:.3g}" for k, v in costs.items())


DEFAULT_POLICY = WinogradPolicy()


def ineligible(call, weight) -> str | None:
    """Why the Relax ``call`` cannot be a Winograd convolution (whatever the policy), or None;
    ``weight`` is its weight as a NumPy array (None when not a constant)."""
    reason = not_dense_nhwc(call, weight)
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


def logged_choice(call, m: int | None, reason: str, kind: str = "") -> int | None:
    """``m``, after logging (``-vv``) what the policy chose for ``call`` and why; ``kind``
    names the convolution (``"block-sparse "``)."""
    if m is None:
        log.debug("%s: direct %sconvolution (%s)", describe_call(call), kind, reason)
    else:
        log.debug("%s: %sWinograd F(%dx%d, 3x3) (%s)", describe_call(call), kind, m, m, reason)
    return m


def winograd_conv2d(policy: WinogradPolicy, fallbacks: FallbackLog | None = None, packing=None):
    """A module pass rewriting the convolutions ``policy`` accepts (see the module docstring);
    ``packing`` (a CpuVector with a lane multiply-add): the GEMM's transformed weights packed by
    its column tile where packed_weights.py's rule takes them."""
    import tvm
    from tvm import relax

    from edgec.targets.schedules import winograd_kernels as kernels
    from edgec.targets.schedules.packed_weights import columns_view, gemm_tile, pack_columns
    from edgec.targets.schedules.winograd import transform_weights, winograd_matrices

    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    def decide(call, weight):
        m, reason = None, ineligible(call, weight)
        if reason is None:
            batch, out_h, out_w, filters = (int(dim) for dim in call.ty.shape)
            m, reason = policy.choose(batch, out_h, out_w, int(weight.shape[2]), filters)
        return logged_choice(call, m, reason)

    def winograd(mutator, call, weight, m):
        mats = winograd_matrices(m)
        padding = tuple(int(p) for p in call.attrs.padding)
        batch, out_h, out_w, _ = (int(dim) for dim in call.ty.shape)
        out_size = (out_h, out_w)
        builder = mutator.builder_
        transform = builder.call_te(lambda data: kernels.input_transform(data, mats, padding, out_size),
                                    call.args[0], primfunc_name_hint=kernels.INPUT_KERNEL)
        # FuseOps would fuse it (injective) into the output transform before it: one kernel
        # no rule schedules well. Opaque, it stays a kernel of its own.
        mutator.patterns.append((transform.args[0], OPAQUE))
        transformed = builder.emit(transform)
        transformed_weights = transform_weights(weight, mats.m)
        tile = None
        if packing is not None:
            rows = int(transformed.ty.shape[1])  # the GEMM rows: output tiles
            tile = gemm_tile(packing, rows, transformed_weights.shape[2], transformed_weights.shape[1])
        if tile is None:
            weights = relax.const(transformed_weights, "float32")
            products = builder.call_te(kernels.gemm, transformed, weights, primfunc_name_hint=kernels.GEMM_KERNEL)
        else:
            weights = relax.const(pack_columns(transformed_weights, tile), "float32")
            products = builder.call_te(lambda data, packed: kernels.gemm(data, columns_view(packed)), transformed, weights,
                                       primfunc_name_hint=kernels.GEMM_KERNEL)  # fmt: skip
        products = builder.emit(products)
        return builder.call_te(lambda gemm: kernels.output_transform(gemm, mats, batch, out_size), products,
                               primfunc_name_hint=kernels.OUTPUT_KERNEL)

    _Rewriter = conv2d_rewriter(decide, winograd, RULE, fallbacks, "kept as a direct convolution")

    @tvm.transform.module_pass(opt_level=0, name="EdgecWinogradConv2d")
    def _pass(mod, _ctx):
        return rewrite_module(mod, _Rewriter)[0]

    return _pass
