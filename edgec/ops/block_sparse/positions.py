"""The positions-vectorised kernel of ``edgec.BlockSparseConv``: 1x1 convolutions whose blocks
are narrower than the CPU's vector (N=4 and N=8 with AVX-512, N=4 with AVX2), computed as
XNNPACK's sparse inference does: a vector holds consecutive output *positions* of one channel,
not a block's N channels, so every lane works whatever N is.

The op's activations stay channels-last (NHWC) at its boundary, like every other kernel; the
kernel changes the layout of one tile of ``P = vectors x lanes`` output positions at a time:

1. transpose in: the tile's P rows of x (C_in contiguous per position) become a channel-major
   scratch ``xt[C_in, P]``: per 4 channels x ``lanes`` positions, ``lanes`` 128-bit loads (one
   per position), the two unpack stages of a 4x4 transpose inside each 128-bit lane (8
   shuffles: ``vunpcklps``/``vunpckhps``, ``vunpcklpd``/``vunpckhpd``) and 4 full-vector
   stores. The ``C_in % 4`` last channels are gathered position by position.
2. per block-row: ``N x vectors`` accumulators start from the bias; each kept block loads
   ``vectors`` vectors ``xt[indices[k], :]`` and multiplies them with its N weights, each
   broadcast: N x vectors FMAs per block.
3. the activation, the same in-lane transpose back, and one 128-bit store per position and 4
   channels into y (NHWC).

Work: ``nnz x N x P`` multiply-adds per tile (the kept blocks only), plus the two transposes,
O(C_in + C_out) per position against ``nnz x N`` per position for the products. The last tile,
when the positions do not fill it, reads its missing positions as copies of the last position
and does not store them. Any stride (a 1x1 window reads one input position per output
position); no padding.
"""

from __future__ import annotations

import dataclasses

from edgec.ops.block_sparse.kernels import ConvShape
from edgec.ops.common import activation_expr
from edgec.targets.vector import CpuVector

__all__ = ["PositionsPlan", "positions_kernel", "positions_plan"]

# channels per group of the in-lane transposes: one 128-bit lane of 4 floats
GROUP = 4


@dataclasses.dataclass(frozen=True)
class PositionsPlan:
    """A tile of ``vectors x lanes`` output positions x one block-row's N channels in registers."""

    lanes: int
    vectors: int

    @property
    def positions(self) -> int:
        return self.lanes * self.vectors


def positions_plan(shape: ConvShape, vector: CpuVector) -> PositionsPlan | None:
    """The plan when this kernel applies to ``shape`` on ``vector``, else None.

    It applies to 1x1 windows without padding whose N is a multiple of 4 and narrower than
    the vector (on NEON, 4 lanes, N=4 already fills a register: the N-vectorised kernel
    stays). One vector of positions per channel (N=4: 16 positions x 4 channels, 4
    accumulators): measured against two (XNNPACK's 32x4 tile, 8 accumulators, which hides
    the FMA latency better) on the 22 pointwise convs of MobileNetV2 and ResNet-18 (Zen5,
    AVX-512, one thread, sparsity 0.7, same run), one vector ran 2.22x dense (geomean), two
    2.11x: the loop is not bound by FMA latency but by the transposes and the loads, and a
    tile of 16 leaves less of a last, partial tile to waste (196 positions: 208 computed
    against 224). Two were better only on the 7x7 layers (49 positions: 64 computed either
    way), by 0-10%.
    """
    n = shape.block_size
    if shape.kernel != (1, 1) or any(shape.pads) or n % GROUP or vector.lanes % GROUP or n >= vector.lanes:
        return None
    return PositionsPlan(vector.lanes, 1)


def positions_kernel(shape: ConvShape, plan: PositionsPlan, activation: str = "none", low: float = 0.0, high: float = 0.0):
    """The PrimFunc ``(x, values, indices, indptr, bias, y)`` for ``shape``, channels-last.

    The arguments are those of :func:`edgec.ops.block_sparse.kernels.conv_kernel` (values
    ``(nnz, 1, 1, N)``). Loops, outermost first: a parallel loop over tiles of
    ``plan.positions`` output positions (all images, rows and columns in one sequence), the
    transpose in, the block-rows, the kept blocks of the block-row (the reduction), the
    register tile (N channels x ``plan.vectors`` vectors, unrolled), the epilogue.
    """
    return _kernel(shape, plan, activation_expr(activation, low, high))


def _unpack(lanes: int, width: int, high: int) -> list[int]:
    """Shuffle indices of x86's unpack-low/high on two ``lanes``-vectors, within each 128-bit
    lane: ``width`` 1 interleaves floats (``vunpcklps``), 2 pairs of floats (``vunpcklpd``)."""
    indices = []
    for lane in range(0, lanes, GROUP):
        for step in range(0, GROUP // 2, width):
            first = lane + GROUP // 2 * high + step
            indices += [first + e for e in range(width)] + [lanes + first + e for e in range(width)]
    return indices


def inlane_transpose(buffer, offsets, lanes: int) -> list:
    """The 4x4 transposes inside every 128-bit lane of 4 vectors ``buffer[offsets[i] : +lanes]``:
    vector ``i`` of the result holds, in lane ``q``, element ``4q + i`` of the 4 inputs."""
    from tvm import tirx

    def shuffle(a, b, width, high):
        return tirx.Shuffle([a, b], [tirx.const(i, "int32") for i in _unpack(lanes, width, high)])

    rows = [tirx.BufferLoad(buffer, [tirx.Ramp(offset, 1, lanes)]) for offset in offsets]
    # floats of rows (0, 1) and (2, 3) interleaved, then pairs of floats of those
    pairs = [shuffle(rows[a], rows[a + 1], 1, high) for a in (0, 2) for high in (0, 1)]
    return [shuffle(pairs[high], pairs[high + 2], 2, half) for high in (0, 1) for half in (0, 1)]


def _kernel(shape: ConvShape, plan: PositionsPlan, act):
    from tvm.script import tirx as T

    batch, channels, n, blocks, nnz = shape.batch, shape.channels, shape.block_size, shape.blocks, shape.nnz
    out_channels = shape.out_channels
    out_h, out_w = shape.out_height, shape.out_width
    positions = batch * out_h * out_w
    lanes, vectors, tile = plan.lanes, plan.vectors, plan.positions
    tiles, full_tiles = -(-positions // tile), positions // tile
    groups, tail = divmod(channels, GROUP)
    sh, sw = shape.strides
    contiguous = shape.strides == (1, 1)  # output position p reads input row p

    def row(p, clamp: bool):
        """Offset in x of the channels of the input position under output position ``p``."""
        if clamp:
            p = T.min(p, positions - 1)
        if contiguous:
            return p * channels
        image, rest = p // (out_h * out_w), p % (out_h * out_w)
        return ((image * shape.height + rest // out_w * sh) * shape.width + rest % out_w * sw) * channels

    @T.macro
    def tile_body(x, vf, indices, indptr, bias, y, t, partial):
        xt = T.alloc_buffer((channels * tile,), "float32")  # channel-major: xt[c * tile + p]
        for g in range(groups):
            for v in T.unroll(vectors):
                rows = T.alloc_buffer((GROUP * lanes,), "float32")  # 4 x lanes: one 128-bit load per position
                for q in T.unroll(lanes // GROUP):
                    for i in T.unroll(GROUP):
                        for j in T.vectorized(GROUP):
                            rows[i * lanes + q * GROUP + j] = x[row(t * tile + v * lanes + q * GROUP + i, partial) + g * GROUP + j]
                columns = T.meta_var(inlane_transpose(rows, [0, lanes, 2 * lanes, 3 * lanes], lanes))
                xt[T.ramp((g * GROUP + 0) * tile + v * lanes, 1, lanes)] = columns[0]
                xt[T.ramp((g * GROUP + 1) * tile + v * lanes, 1, lanes)] = columns[1]
                xt[T.ramp((g * GROUP + 2) * tile + v * lanes, 1, lanes)] = columns[2]
                xt[T.ramp((g * GROUP + 3) * tile + v * lanes, 1, lanes)] = columns[3]
        for c in range(tail):
            for p in T.vectorized(tile):
                xt[(groups * GROUP + c) * tile + p] = x[row(t * tile + p, partial) + groups * GROUP + c]
        for b in range(blocks):
            acc = T.alloc_buffer((n * tile,), "float32")  # acc[(j * vectors + v) * lanes + l]: registers
            for j in T.unroll(n):
                for v in T.unroll(vectors):
                    for l in T.vectorized(lanes):
                        acc[(j * vectors + v) * lanes + l] = bias[b * n + j]
            for k in range(indptr[b], indptr[b + 1]):
                for j in T.unroll(n):
                    for v in T.unroll(vectors):
                        for l in T.vectorized(lanes):
                            acc[(j * vectors + v) * lanes + l] = (
                                acc[(j * vectors + v) * lanes + l] + vf[k * n + j] * xt[indices[k] * tile + v * lanes + l]
                            )
            for e in T.unroll(n * vectors):
                for l in T.vectorized(lanes):
                    acc[e * lanes + l] = act(acc[e * lanes + l])
            for v in T.unroll(vectors):
                for h in T.unroll(n // GROUP):
                    out = T.alloc_buffer((GROUP * lanes,), "float32")  # lane q of out[i]: position 4q + i
                    first = T.meta_var((h * GROUP * vectors + v) * lanes)
                    pixels = T.meta_var(inlane_transpose(acc, [first + i * vectors * lanes for i in range(GROUP)], lanes))
                    out[T.ramp(0, 1, lanes)] = pixels[0]
                    out[T.ramp(lanes, 1, lanes)] = pixels[1]
                    out[T.ramp(2 * lanes, 1, lanes)] = pixels[2]
                    out[T.ramp(3 * lanes, 1, lanes)] = pixels[3]
                    for q in T.unroll(lanes // GROUP):
                        for i in T.unroll(GROUP):
                            if partial:
                                if t * tile + v * lanes + q * GROUP + i < positions:
                                    for j in T.vectorized(GROUP):
                                        y[(t * tile + v * lanes + q * GROUP + i) * out_channels + b * n + h * GROUP + j] = out[
                                            i * lanes + q * GROUP + j
                                        ]
                            else:
                                for j in T.vectorized(GROUP):
                                    y[(t * tile + v * lanes + q * GROUP + i) * out_channels + b * n + h * GROUP + j] = out[
                                        i * lanes + q * GROUP + j
                                    ]

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((batch, shape.height, shape.width, channels), "float32"),
        values: T.Buffer((nnz, 1, 1, n), "float32"),
        indices: T.Buffer((nnz,), "int32"),
        indptr: T.Buffer((blocks + 1,), "int32"),
        bias: T.Buffer((out_channels,), "float32"),
        y: T.Buffer((batch, out_h, out_w, out_channels), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        xf = T.decl_buffer((batch * shape.height * shape.width * channels,), "float32", data=x.data)
        vf = T.decl_buffer((nnz * n,), "float32", data=values.data)
        yf = T.decl_buffer((positions * out_channels,), "float32", data=y.data)
        for t in T.parallel(tiles):
            if t < full_tiles:
                tile_body(xf, vf, indices, indptr, bias, yf, t, False)
            else:
                tile_body(xf, vf, indices, indptr, bias, yf, t, True)

    return kernel
