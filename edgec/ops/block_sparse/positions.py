"""The positions-vectorised kernel of ``edgec.BlockSparseConv``: convolutions whose blocks are
narrower than the CPU's vector (N=4 and N=8 with AVX-512, N=4 with AVX2), computed as XNNPACK's
sparse inference does: a vector holds consecutive output *positions* of one channel, not a
block's N channels, so every lane works whatever N is. Any window, stride, dilation and padding.

The op's activations stay channels-last (NHWC) at its boundary, like every other kernel; the
kernel changes the layout of one tile of ``P = vectors x lanes`` output positions at a time:

1. transpose in: for each tap ``(r, s)`` of the ``kh x kw`` window, the P input positions under
   the tile's outputs (C_in contiguous per position) become a channel-major scratch
   ``xt[tap, C_in, P]`` (an im2col of the tile, transposed): per 4 channels x ``lanes``
   positions, ``lanes`` 128-bit loads (one per position, inserted into 4 vectors in registers:
   built in a stack buffer, each vector was read back from four narrower stores, and 3x3 layers
   ran 4-19% slower), the two unpack stages of a 4x4 transpose inside each 128-bit lane (8
   shuffles: ``vunpcklps``/``vunpckhps``, ``vunpcklpd``/``vunpckhpd``) and 4 full-vector
   stores. With padding, the kernel first copies x into a zero-bordered buffer (as the
   N-vectorised kernel does), so no load tests a border, with its channels rounded up to a
   multiple of 4 (zeros no kept block reads: ResNet-18's 3-channel 7x7 stem 17% faster than
   with its 3 channels gathered one float at a time); without, the ``C_in % 4`` last channels
   are gathered position by position. A 1x1 window is one tap.
2. per block-row: ``N x vectors`` accumulators start from the bias; each kept block (one input
   channel, every tap) loads, per tap, ``vectors`` vectors ``xt[tap, indices[k], :]`` and
   multiplies them with its N weights of that tap, each broadcast: ``kh x kw x N x vectors``
   FMAs per block.
3. the activation, then back to NHWC: the output channels in runs of ``lanes`` (``lanes / N``
   block-rows) go through a channel-major scratch ``yt[lanes, P]`` and a ``lanes x lanes``
   transpose (the in-lane 4x4 transposes, then swaps of 128-bit blocks: 64 shuffles for 16
   lanes) to one full-vector store per position; the block-rows left (``C_out % lanes``
   channels) take the in-lane transpose alone and one 128-bit store per position and 4
   channels. Measured (22 pointwise convs, N=4, sparsity 0.7, one thread, same run): 2.36x
   dense with the runs, 2.24x with 128-bit stores for every block-row; the layers with few
   input channels gain most (16 -> 96 at 112x112: 1.84x against 1.48x), their time being
   mostly this epilogue.

Work: ``nnz x N x kh x kw x P`` multiply-adds per tile (the kept blocks only), plus the two
transposes, O(kh x kw x C_in + C_out) per position against ``nnz x N x kh x kw`` per position
for the products. The last tile, when the positions do not fill it, reads its missing positions
as copies of the last position and does not store them. The scratch is ``kh x kw x C_in x P``
floats (ResNet-18's 3x3 512-channel layers: 288 KiB, in the core's L2; ``C_in`` rounded up to 4
with padding).
"""

from __future__ import annotations

import dataclasses

from edgec.ops.block_sparse.kernels import ConvShape, padded_copy
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

    It applies to convolutions (any window) whose N is a multiple of 4 and narrower than
    the vector (on NEON, 4 lanes, N=4 already fills a register: the N-vectorised kernel
    stays). One vector of positions per channel (N=4: 16 positions x 4 channels, 4
    accumulators): measured against two (XNNPACK's 32x4 tile, 8 accumulators, which hides
    the FMA latency better) on the 22 pointwise convs of MobileNetV2 and ResNet-18 (Zen5,
    AVX-512, one thread, sparsity 0.7, same run, 128-bit stores then), one vector ran 2.22x
    dense (geomean), two 2.11x: the loop is not bound by FMA latency but by the transposes and
    the loads (two accumulator sets over alternate kept blocks did not help either), and a
    tile of 16 leaves less of a last, partial tile to waste (196 positions: 208 computed
    against 224). Two were better only on the 7x7 layers (49 positions: 64 computed either
    way), by 0-10%.
    """
    n = shape.block_size
    if n % GROUP or vector.lanes % GROUP or n >= vector.lanes:
        return None
    return PositionsPlan(vector.lanes, 1)


def positions_kernel(shape: ConvShape, plan: PositionsPlan, activation: str = "none", low: float = 0.0, high: float = 0.0,
                     elements: int = 1):
    """The PrimFunc ``(x, values, indices, indptr, bias, y)`` for ``shape``, channels-last.

    The arguments are those of :func:`edgec.ops.block_sparse.kernels.conv_kernel` (values
    ``(nnz, kh, kw, N)``). Loops, outermost first: (with padding, the zero-bordered copy of
    x, then) a parallel loop over tiles of ``plan.positions`` output positions (all images,
    rows and columns in one sequence), the transpose in of every tap, the block-rows, the kept
    blocks of the block-row (the reduction), the taps and the register tile (N channels x
    ``plan.vectors`` vectors; all unrolled), the epilogue.

    ``elements`` > 1: that many products of one block pattern, each with its own values and
    positions (the tile-element GEMMs of a block-sparse Winograd convolution, winograd_gemm.py):
    ``x`` ``(elements, positions, C_in)``, ``values`` ``(elements, nnz, N)``, ``y``
    ``(elements, positions, C_out)``, the parallel loop over (element, tile); for a 1x1,
    stride-1 ``shape`` of one image row (``positions`` its width).
    """
    if elements > 1 and ((shape.batch, shape.height) != (1, 1) or not shape.pointwise):
        raise ValueError(f"{elements} elements need one row of positions, 1x1, stride 1, no padding, not {shape}")
    return _kernel(shape, plan, activation_expr(activation, low, high), elements)


def _unpack(lanes: int, width: int, high: int) -> list[int]:
    """Shuffle indices of x86's unpack-low/high on two ``lanes``-vectors, within each 128-bit
    lane: ``width`` 1 interleaves floats (``vunpcklps``), 2 pairs of floats (``vunpcklpd``)."""
    indices = []
    for lane in range(0, lanes, GROUP):
        for step in range(0, GROUP // 2, width):
            first = lane + GROUP // 2 * high + step
            indices += [first + e for e in range(width)] + [lanes + first + e for e in range(width)]
    return indices


def vector_loads(buffer, offsets, lanes: int) -> list:
    """``buffer[offset : offset + lanes]`` for each offset, as vector expressions."""
    from tvm import tirx

    return [tirx.BufferLoad(buffer, [tirx.Ramp(offset, 1, lanes)]) for offset in offsets]


def lane_rows(buffer, offsets, lanes: int) -> list:
    """4 vectors: 128-bit lane ``q`` of vector ``i`` holds the 4 floats of ``buffer`` at
    ``offsets[4 q + i]``, each a 128-bit load put in place in registers (``vinsertf32x4``; built
    in a stack buffer instead, each vector was read back from four narrower stores)."""
    from tvm import tirx

    whole = [tirx.const(k, "int32") for k in range(lanes)]
    return [
        tirx.Shuffle([tirx.BufferLoad(buffer, [tirx.Ramp(offsets[q * GROUP + i], 1, GROUP)]) for q in range(lanes // GROUP)], whole)
        for i in range(GROUP)
    ]


def _shuffle(a, b, indices):
    from tvm import tirx

    return tirx.Shuffle([a, b], [tirx.const(i, "int32") for i in indices])


def _same(value):
    return value


def inlane_transpose(rows: list, lanes: int, bind=_same) -> list:
    """The 4x4 transposes inside every 128-bit lane of 4 vectors: vector ``i`` of the result
    holds, in lane ``q``, element ``4q + i`` of the 4 inputs (``vunpck*ps``, then ``vunpck*pd``).
    ``bind`` names a value used twice (see :func:`store_positions`)."""
    pairs = [bind(_shuffle(rows[a], rows[a + 1], _unpack(lanes, 1, high))) for a in (0, 2) for high in (0, 1)]
    return [_shuffle(pairs[high], pairs[high + 2], _unpack(lanes, 2, half)) for high in (0, 1) for half in (0, 1)]


def _swap_blocks(a, b, distance: int, high: int, lanes: int):
    """One butterfly stage of a transpose of 128-bit blocks: in each run of ``2 * distance``
    blocks, the low (or ``high``) ``distance`` blocks of ``a`` then those of ``b``."""
    blocks, indices = lanes // GROUP, []
    for run in range(0, blocks, 2 * distance):
        for source in (0, lanes):
            for block in range(run + high * distance, run + high * distance + distance):
                indices += [source + block * GROUP + e for e in range(GROUP)]
    return _shuffle(a, b, indices)


def transpose(rows: list, lanes: int, bind=_same) -> list:
    """The ``lanes x lanes`` transpose of ``lanes`` vectors: the in-lane 4x4 transposes of each
    4 rows, then the transpose of the 128-bit blocks across them in butterfly stages (LLVM:
    ``vshuff64x2``, ``vpermt2pd``, ``vinsertf64x4``; 64 shuffles for 16 lanes). Result ``p``
    holds element ``p`` of every row; ``bind`` names a value used twice."""
    inlane = [[bind(v) for v in inlane_transpose(rows[g : g + GROUP], lanes, bind)] for g in range(0, lanes, GROUP)]
    columns = [None] * lanes
    for i in range(GROUP):
        stage = [inlane[group][i] for group in range(lanes // GROUP)]  # block q of stage[g]: position 4q + i
        distance = len(stage) // 2
        while distance:
            swapped = list(stage)
            for k in range(len(stage)):
                if not k // distance % 2:
                    swapped[k] = _swap_blocks(stage[k], stage[k + distance], distance, 0, lanes)
                    swapped[k + distance] = _swap_blocks(stage[k], stage[k + distance], distance, 1, lanes)
            distance //= 2
            stage = [bind(value) for value in swapped] if distance else swapped
        for q, column in enumerate(stage):
            columns[GROUP * q + i] = column
    return columns


def lane_columns(rows: list, lanes: int, bind=_same) -> list:
    """Per position ``p`` of 4 vectors (``lanes`` positions of 4 channels), its 4 channels: the
    in-lane transposes, then 128-bit lane ``q`` of vector ``i`` is position ``4q + i``."""
    from tvm import tirx

    pixels = [bind(value) for value in inlane_transpose(rows, lanes, bind)]
    columns = [None] * lanes
    for q in range(lanes // GROUP):
        for i in range(GROUP):
            lane = [tirx.const(GROUP * q + e, "int32") for e in range(GROUP)]
            columns[GROUP * q + i] = tirx.Shuffle([pixels[i]], lane)
    return columns


def store_positions(y, rows: list, columns_of, lanes: int, first, stride: int, offset, valid):
    """Store the columns ``columns_of(rows, lanes, bind)`` (one per position ``p``) at
    ``y[(first + p) * stride + offset :]``, emitted into the TVMScript function being parsed;
    with ``valid`` (a position count) only positions below it. Every value the columns share
    is bound once (a Bind statement) rather than repeated in each column's expression:
    repeated, the 16x16 transposes took MobileNetV2's build from 13 s to 30 s."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as builder

    for p, column in enumerate(columns_of(rows, lanes, builder.Bind)):
        index = [tirx.Ramp((first + p) * stride + offset, 1, len(column.indices))]
        if valid is None:
            builder.buffer_store(y, column, index)
        else:
            with builder.If(first + p < valid):
                with builder.Then():
                    builder.buffer_store(y, column, index)


def _kernel(shape: ConvShape, plan: PositionsPlan, act, elements: int):
    from tvm.script import tirx as T

    batch, channels, n, blocks, nnz = shape.batch, shape.channels, shape.block_size, shape.blocks, shape.nnz
    out_channels = shape.out_channels
    out_h, out_w = shape.out_height, shape.out_width
    positions = batch * out_h * out_w
    lanes, vectors, tile = plan.lanes, plan.vectors, plan.positions
    tiles, full_tiles = -(-positions // tile), positions // tile
    sh, sw = shape.strides
    dh, dw = shape.dilations
    kh, kw = shape.kernel
    window = kh * kw
    padded = any(shape.pads)
    # with padding, x's copy has its channels rounded up to the 4 of a 128-bit transpose (zeros that
    # no kept block reads): every channel goes through the in-lane transposes, none is gathered
    # one float at a time (ResNet-18's 3-channel stem: 4 of them per tap instead of 3 gathers)
    stride_c = -(-channels // GROUP) * GROUP if padded else channels  # floats per position in x or its copy
    groups, tail = divmod(stride_c, GROUP)
    padded_h, padded_w = shape.padded_height, shape.padded_width  # of x's zero-bordered copy
    contiguous = shape.pointwise  # output position p reads input row p
    wide = out_channels // lanes  # runs of `lanes` output channels

    # element e's positions and blocks start at position e * positions and block e * nnz; with one
    # element, e is None and no offset is written (the kernel is the single product's, unchanged)
    def first(e, p):
        """Position ``p`` of element ``e`` in the flattened x and y."""
        return p if e is None else e * positions + p

    def row(e, p, r, s, clamp: bool):
        """Offset in x (its zero-bordered copy, with padding) of the channels of the input
        position under output position ``p`` for the tap ``(r, s)``."""
        if clamp:
            p = T.min(p, positions - 1)
        if contiguous:
            return first(e, p) * stride_c
        image, rest = p // (out_h * out_w), p % (out_h * out_w)
        return ((image * padded_h + rest // out_w * sh + r * dh) * padded_w + rest % out_w * sw + s * dw) * stride_c

    def accumulate(acc, xt, vf, indices, indptr, bias, b, e):
        """Emit (into the function being parsed, not as a TVMScript macro: each macro call
        walks the Python stack, which costs 0.1-0.5 s in a process that has imported torch)
        the block-row ``b``: ``acc[(j * vectors + v) * lanes + l]``, channel ``j`` at position
        ``v * lanes + l``, from the bias, over the kept blocks, then activated."""
        from tvm.script.ir_builder import tirx as builder

        for j in range(n):
            for v in range(vectors):
                with builder.vectorized(lanes) as l:
                    builder.buffer_store(acc, bias[b * n + j], [(j * vectors + v) * lanes + l])
        with builder.serial(indptr[b], indptr[b + 1]) as k:
            block = k if e is None else e * nnz + k
            for tap in range(window):
                for j in range(n):
                    for v in range(vectors):
                        with builder.vectorized(lanes) as l:
                            at = (j * vectors + v) * lanes + l
                            w = vf[(block * window + tap) * n + j]
                            builder.buffer_store(acc, acc[at] + w * xt[(tap * stride_c + indices[k]) * tile + v * lanes + l], [at])
        for slot in range(n * vectors):
            with builder.vectorized(lanes) as l:
                builder.buffer_store(acc, act(acc[slot * lanes + l]), [slot * lanes + l])

    @T.macro
    def tile_body(x, vf, indices, indptr, bias, y, e, t, partial):
        xt = T.alloc_buffer((window * stride_c * tile,), "float32")  # xt[(tap * stride_c + c) * tile + p]
        for r in range(kh):
            for s in range(kw):
                for g in range(groups):
                    for v in T.unroll(vectors):
                        # 4 x lanes: one 128-bit load per position, put together in registers
                        offsets = T.meta_var([row(e, t * tile + v * lanes + p, r, s, partial) + g * GROUP for p in range(lanes)])
                        columns = T.meta_var(inlane_transpose(lane_rows(x, offsets, lanes), lanes))
                        at = T.meta_var(((r * kw + s) * stride_c + g * GROUP) * tile + v * lanes)
                        xt[T.ramp(at, 1, lanes)] = columns[0]
                        xt[T.ramp(at + tile, 1, lanes)] = columns[1]
                        xt[T.ramp(at + 2 * tile, 1, lanes)] = columns[2]
                        xt[T.ramp(at + 3 * tile, 1, lanes)] = columns[3]
                for c in range(tail):
                    for p in T.vectorized(tile):
                        src = T.meta_var(row(e, t * tile + p, r, s, partial) + groups * GROUP + c)
                        xt[((r * kw + s) * stride_c + groups * GROUP + c) * tile + p] = x[src]
        # channels in runs of `lanes` (lanes / N block-rows): full-vector stores per position
        for w in range(wide):
            yt = T.alloc_buffer((lanes * tile,), "float32")  # the run's channels, channel-major
            for part in range(lanes // n):
                acc = T.alloc_buffer((n * tile,), "float32")
                accumulate(acc, xt, vf, indices, indptr, bias, w * (lanes // n) + part, e)
                for slot in T.unroll(n * vectors):
                    for l in T.vectorized(lanes):
                        yt[part * n * tile + slot * lanes + l] = acc[slot * lanes + l]
            for v in T.unroll(vectors):
                store_positions(
                    y, vector_loads(yt, [c * tile + v * lanes for c in range(lanes)], lanes), transpose, lanes,
                    first(e, t * tile + v * lanes), out_channels, w * lanes, first(e, positions) if partial else None,
                )  # fmt: skip
        # the block-rows left: 128-bit stores of 4 channels per position
        # (a loop from wide * lanes / N to blocks instead stored wrong values here: from 0 it is right)
        for rest in range(blocks - wide * (lanes // n)):
            b = T.meta_var(wide * (lanes // n) + rest)
            acc = T.alloc_buffer((n * tile,), "float32")
            accumulate(acc, xt, vf, indices, indptr, bias, b, e)
            for v in T.unroll(vectors):
                for h in T.unroll(n // GROUP):
                    store_positions(
                        y, vector_loads(acc, [((h * GROUP + i) * vectors + v) * lanes for i in range(GROUP)], lanes),
                        lane_columns, lanes, first(e, t * tile + v * lanes), out_channels, b * n + h * GROUP,
                        first(e, positions) if partial else None,
                    )  # fmt: skip

    @T.macro
    def tiles_loop(xf, vf, indices, indptr, bias, yf):
        for t in T.parallel(elements * tiles):  # (element, tile of its positions); one element: the tile
            e = T.meta_var(None if elements == 1 else t // tiles)
            tile_of = T.meta_var(t if elements == 1 else t % tiles)
            if full_tiles == tiles:  # (Python conditions: a branch that never runs is not generated)
                tile_body(xf, vf, indices, indptr, bias, yf, e, tile_of, False)
            elif full_tiles == 0:
                tile_body(xf, vf, indices, indptr, bias, yf, e, tile_of, True)
            elif tile_of < full_tiles:
                tile_body(xf, vf, indices, indptr, bias, yf, e, tile_of, False)
            else:
                tile_body(xf, vf, indices, indptr, bias, yf, e, tile_of, True)

    pad_copy = padded_copy(shape, stride_c)

    if elements == 1:
        x_shape, values_shape = (batch, shape.height, shape.width, channels), (nnz, kh, kw, n)
        y_shape = (batch, out_h, out_w, out_channels)
    else:
        x_shape, values_shape, y_shape = (elements, positions, channels), (elements, nnz, n), (elements, positions, out_channels)

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer(x_shape, "float32"),
        values: T.Buffer(values_shape, "float32"),
        indices: T.Buffer((nnz,), "int32"),
        indptr: T.Buffer((blocks + 1,), "int32"),
        bias: T.Buffer((out_channels,), "float32"),
        y: T.Buffer(y_shape, "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        xf = T.decl_buffer((elements * batch * shape.height * shape.width * channels,), "float32", data=x.data)
        vf = T.decl_buffer((elements * nnz * window * n,), "float32", data=values.data)
        yf = T.decl_buffer((elements * positions * out_channels,), "float32", data=y.data)
        if padded:  # (Python conditions: a branch that never runs is not generated)
            xp = T.decl_buffer((batch * padded_h * padded_w * stride_c,), "float32")
            pad_copy(xf, xp)
            tiles_loop(xp, vf, indices, indptr, bias, yf)
        else:
            tiles_loop(xf, vf, indices, indptr, bias, yf)

    return kernel
