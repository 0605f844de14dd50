"""Graph rewrite for CPUs with a lane multiply-add (aarch64): the weights of a convolution that
reads its input by lane (``common.lane_broadcast``) are packed by the register tile's output
channels ``T``, once, here:

    conv2d(x, W)  ->  conv2d(x, P),   P[f / T, ry, rx, rc, f % T] = W[ry, rx, rc, f]

for a Relax ``conv2d`` in channels-last layout (NHWC data, HWIO constant float32 weights),
groups 1, whose input channels are whole vectors of more than one (``wants_lane_broadcast``)
and whose register tile (``common.register_tile``, as ``conv2d.Conv2DNHWC`` picks it) holds
fewer output channels than the convolution. Why: per reduction step the tile loads ``T / lanes``
weight vectors. In HWIO the next step's sit ``F`` floats further on; a loop body of 4 unrolled
steps reads them at offsets up to ``3 * 4 F`` bytes from one base register, beyond what ``ldp``
can pair (signed 7 bits of 16 bytes: +-1008), so LLVM loads each with its own ``ldr q``. Packed,
a step's vectors and the next step's are adjacent and every pair is one ``ldp``.

The kernel (``conv2d_packed``) is TOPI's channels-last convolution on ``W`` written as a view of
``P``; the schedule library inlines the view (``conv2d.conv_regions`` reads ``P[f // T, ry, rx,
rc, f % T]``). Runs after the layout pass and the channel padding (graph.py), before LegalizeOps;
FuseOps fuses the epilogue after it as after a conv2d. A convolution left alone stays a conv2d.
"""

from __future__ import annotations

import logging

import numpy as np

from edgec.core.fallbacks import FallbackLog
from edgec.targets.schedules.conv2d import conv_tile
from edgec.targets.schedules.guard import describe_call
from edgec.targets.schedules.te_rewrite import conv2d_rewriter, not_dense_nhwc, rewrite_module
from edgec.targets.vector import CpuVector

log = logging.getLogger(__name__)

RULE = "graph:packed-weights"
OUT_EWISE_FUSABLE = 4  # relax's OpPatternKind kOutEWiseFusable: FuseOps fuses the epilogue after it


def pack_weights(weight: np.ndarray, tile: int) -> np.ndarray:
    """HWIO ``[kh, kw, ic, oc]`` -> ``[oc / tile, kh, kw, ic, tile]`` (module docstring)."""
    kh, kw, channels, filters = weight.shape
    blocks = weight.reshape(kh, kw, channels, filters // tile, tile)
    return np.ascontiguousarray(blocks.transpose(3, 0, 1, 2, 4))


def packed_tile(call, weight: np.ndarray | None, vector: CpuVector) -> tuple[int | None, str]:
    """(output-channel tile ``T``, why) for the Relax conv2d ``call``; ``T`` None: left alone."""
    reason = not_dense_nhwc(call, weight)
    if reason is not None:
        return None, reason
    dtypes = {str(call.args[0].ty.dtype), str(weight.dtype), str(call.ty.dtype)}
    if dtypes != {"float32"}:
        return None, f"dtypes {sorted(dtypes)}, not float32"
    if any(not hasattr(dim, "value") for dim in [*call.args[0].ty.shape, *call.ty.shape]):
        return None, "the shapes are not static"
    channels, filters = int(weight.shape[2]), int(weight.shape[3])
    _, height, width, _ = (int(dim) for dim in call.ty.shape)
    lane, _, staged, (_, tile) = conv_tile(vector, [height, width], filters, channels, vector.lane_fma)
    if not (lane or staged):
        return None, f"{channels} input channels: not read by lane"
    if tile >= filters or filters % tile:
        return None, f"a register tile of {tile} of the {filters} output channels: nothing to pack"
    return tile, f"packed by {tile} output channels"


def conv2d_packed(data, packed, strides, padding, dilation, filters: int):
    """TOPI's NHWC/HWIO convolution of ``data`` on the weights ``packed`` holds (``pack_weights``)."""
    from tvm import te, topi

    _, kh, kw, channels, tile = (int(dim) for dim in packed.shape)
    weight = te.compute((kh, kw, channels, filters), lambda ry, rx, rc, f: packed[f // tile, ry, rx, rc, f % tile],
                        name="packed_weight_view")  # fmt: skip
    return topi.nn.conv(data, weight, strides, padding, dilation, 1, "NHWC", "HWIO")


def packed_weights_conv2d(vector: CpuVector, fallbacks: FallbackLog | None = None):
    """A module pass rewriting the convolutions above (module docstring)."""
    import tvm
    from tvm import relax

    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    def decide(call, weight):
        tile, reason = packed_tile(call, weight, vector)
        log.debug("%s: %s", describe_call(call), reason)
        return tile

    def rewrite(mutator, call, weight, tile):
        attrs = call.attrs
        strides = [int(s) for s in attrs.strides]
        padding = [int(p) for p in attrs.padding]
        dilation = [int(d) for d in attrs.dilation]
        filters = int(weight.shape[3])
        packed = relax.const(pack_weights(weight, tile), "float32")
        kernel = mutator.builder_.call_te(lambda x, w: conv2d_packed(x, w, strides, padding, dilation, filters),
                                          call.args[0], packed, primfunc_name_hint="conv2d_packed")  # fmt: skip
        mutator.patterns.append((kernel.args[0], OUT_EWISE_FUSABLE))
        return kernel

    _Rewriter = conv2d_rewriter(decide, rewrite, RULE, fallbacks, "kept as a conv2d on HWIO weights")

    @tvm.transform.module_pass(opt_level=0, name="EdgecPackedWeights")
    def _pass(mod, _ctx):
        return rewrite_module(mod, _Rewriter)[0]

    return _pass
