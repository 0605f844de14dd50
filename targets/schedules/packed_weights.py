"""Graph rewrite for CPUs with a lane multiply-add (aarch64): the weights of a convolution read
by lane (``common.lane_broadcast``, or a staged RGB stem's unrolled taps) are packed by the
register tile's output channels ``T``, once, here:

    conv2d(x, W)  ->  conv2d(x, P),   P[f / T, ry, rx, rc, f % T] = W[ry, rx, rc, f]

for a Relax ``conv2d`` in channels-last layout (NHWC data, HWIO constant float32 weights),
groups 1, whose register tile (``conv2d.conv_tile``, as ``conv2d.Conv2DNHWC`` picks it) holds
fewer output channels than the convolution, and whose HWIO weights for one loop body (4
reduction steps, or a stem's kernel row of taps) span more than ``LDP_REACH`` bytes. Why: per
reduction step the tile loads ``T / lanes`` weight vectors; in HWIO the next step's sit ``F``
floats further on, and a loop body reads them all at offsets from one base register, beyond
what ``ldp`` can pair, so LLVM loads each with its own ``ldr q``. Packed, a tile's weights are
one contiguous run, a step's vectors next to the next step's, and LLVM pairs them.

The kernel (``conv2d_packed``) is TOPI's channels-last convolution on ``W`` written as a view of
``P``; the schedule library inlines the view (``conv2d.conv_regions`` reads ``P[f // T, ry, rx,
rc, f % T]``). Runs after the layout pass and the channel padding (graph.py), before LegalizeOps;
FuseOps fuses the epilogue after it as after a conv2d. A convolution left alone stays a conv2d.
"""

from __future__ import annotations

import logging

import numpy as np

from edgec.core.fallbacks import FallbackLog
from edgec.targets.schedules.common import register_tile, wants_lane_broadcast
from edgec.targets.schedules.conv2d import conv_tile
from edgec.targets.schedules.te_rewrite import conv2d_rewriter, explained, not_dense_nhwc, rewrite_module
from edgec.targets.vector import CpuVector

log = logging.getLogger(__name__)

RULE = "graph:packed-weights"
# the farthest offset from its base register an ``ldp`` of two q registers reaches (a signed 7-bit
# immediate in 16-byte units). A loop body whose HWIO weights span no more than this is paired as
# it is; packed, such convolutions ran up to 10% more instructions on cortex-a53 (MobileNetV2's
# 96 -> 24 1x1 at 56x56, 2,288,099 -> 2,515,689; ShuffleNetV2's 48-channel 1x1s 1.03x, its 3x3/2
# stem, 864 bytes, 1.001x), those beyond it 0.95-0.99x.
LDP_REACH = 1008
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
    steps = weight.shape[1] * channels if staged else vector.lanes  # reduction steps of one loop body
    span = steps * filters * weight.dtype.itemsize
    if span <= LDP_REACH:
        return None, f"HWIO weights of a loop body span {span} bytes: within ldp's reach"
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


def emit_conv2d_packed(mutator, call, weight: np.ndarray, tile: int):
    """The Relax conv2d ``call`` on HWIO ``weight`` as ``conv2d_packed`` on them packed by ``tile``
    output channels, emitted by ``mutator`` (a ``te_rewrite.conv2d_rewriter``), its epilogue fusable."""
    from tvm import relax

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


def gemm_tile(vector: CpuVector, rows: int, columns: int, depth: int) -> int | None:
    """The column tile ``T`` to pack a matrix product's constant ``[..., depth, columns]`` operand
    by (``pack_columns``; the Winograd GEMM's transformed weights), as ``dense.Dense`` tiles it, or
    None where the rule above leaves it alone (not read by lane, one tile, within ldp's reach)."""
    if not wants_lane_broadcast(vector, depth):
        return None
    _, tile = register_tile([rows], columns, vector, lane_operand=True)
    if tile >= columns or columns % tile or vector.lanes * columns * 4 <= LDP_REACH:
        return None
    return tile


def pack_columns(matrix: np.ndarray, tile: int) -> np.ndarray:
    """``[..., depth, columns]`` -> ``[..., columns / tile, depth, tile]``."""
    *batch, depth, columns = matrix.shape
    blocks = matrix.reshape(*batch, depth, columns // tile, tile)
    return np.ascontiguousarray(np.moveaxis(blocks, -2, -3))


def columns_view(packed):
    """The ``[..., depth, columns]`` matrix ``packed`` holds (``pack_columns``), as a TE view the
    schedule library inlines (``dense.packed_columns``)."""
    from tvm import te

    *batch, blocks, depth, tile = (int(dim) for dim in packed.shape)
    count = len(batch)
    return te.compute((*batch, depth, blocks * tile),
                      lambda *i: packed[(*i[:count], i[count + 1] // tile, i[count], i[count + 1] % tile)],
                      name="packed_columns_view")  # fmt: skip


def packed_weights_conv2d(vector: CpuVector, fallbacks: FallbackLog | None = None):
    """A module pass rewriting the convolutions above (module docstring)."""
    import tvm

    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    decide = explained(lambda call, weight: packed_tile(call, weight, vector), log)
    _Rewriter = conv2d_rewriter(decide, emit_conv2d_packed, RULE, fallbacks, "kept as a conv2d on HWIO weights")

    @tvm.transform.module_pass(opt_level=0, name="EdgecPackedWeights")
    def _pass(mod, _ctx):
        return rewrite_module(mod, _Rewriter)[0]

    return _pass
