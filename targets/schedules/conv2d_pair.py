"""int8 x int8 pair products for aarch64 without the dot product (cortex-a53): 16 MACs per 3
instructions, ``smull`` + ``smlal2`` into int16 lanes and ``sadalp`` into int32.

dot_graph.py rewrites an integer convolution (``CpuVector.pair_product``) as

    signed[n, y, x, c]  = x ^ 0x80 as int8                       (dot_kernels.signed_input)
    partial[n, y, x, f, l] = sum_{ry, rx, b, h, e} int32(signed[n, y*s + ry*d, x*s + rx*d, 16b + c(l, h, e)])
                                                 * int32(P[ry, rx, b, f, c(l, h, e)]),  c = 2l + e + 8h
    conv2d_nhwc_pair[n, y, x, f] = sum_l partial[n, y, x, f, l]

with the weights packed ``P[kh, kw, ic/16, oc, 16] = W[kh, kw, 16b + j, oc]``: one output channel's 16
input channels of a block are one 16-byte vector, as a pixel's 16 channels of the activations are.
One block of one (pixel, output channel) is::

    t.8h  = smull  x.8b,  w.8b      // channels 0-7:  t[i] = x[i] * w[i]
    t.8h += smlal2 x.16b, w.16b     // channels 8-15: t[i] += x[8 + i] * w[8 + i]
    acc.4s += sadalp t.8h           // acc[l] += t[2l] + t[2l + 1]

so the int32 accumulator's lane ``l`` sums channels ``2l, 2l + 1, 8 + 2l, 9 + 2l`` of every block
(``c(l, h, e)`` above), and the output channel's value is the sum of its 4 lanes, taken once after
the reduction, in the epilogue (``addp``). No lane broadcast (``smull`` has no indexed form): each
product pairs a pixel's vector with an output channel's vector, so the register tile is pixels x
output channels, one accumulator vector each, and per block loads one vector per pixel (+ ``eor``)
and one per output channel.

Bound: an int16 lane holds two products, each ``|x * w| <= 128 * 127`` (int8 activations, shifted
as dot_graph.py does; weights in [-127, 127]: a weight of -128 keeps the layer a convolution,
dot_graph.ineligible), so at most 32,512 <= 32,767: exact.
"""

from __future__ import annotations

from edgec.targets.schedules.common import (
    Rule,
    buffer_size,
    divisors,
    block_work,
    extents,
    inline_epilogue,
    inline_producers,
    parallel_outer,
    schedule_injective,
    split_init,
    split_tiles,
    vectorize_innermost,
)
from edgec.targets.schedules.conv2d_dot import copy_at, pads, read_index
from edgec.targets.schedules.dot_kernels import SIGNED, Geometry, Window

BLOCK = 16  # input channels of one smull + smlal2
LANES = 4  # int32 lanes of one accumulator: partial sums of one output channel
KERNEL = "conv2d_pair"  # the PrimFunc (fused: fused_conv2d_pair_add_...)
ANCHOR = "conv2d_nhwc_pair_partial"  # the reduction block
SUM = "conv2d_nhwc_pair"  # the sum of an accumulator's lanes
PAIR_INTRIN = "edgec_pair_smull_sadalp"
SUM_INTRIN = "edgec_pair_lane_sum"
# of 32 registers, beside a vector per pixel and per output channel and the int16 products (not
# tuned further: 20 gives the same 14x14 inner loops, 3.75 instructions per smull)
MAX_ACCUMULATORS = 16
# output channels of a one-pixel tile: LLVM unrolls the block loop and loads two blocks' weights
# ahead (7x7 160 -> 960 on cortex-a53: 12 channels spilled, 4.67 instructions per smull; 8: 4.19)
MAX_SINGLE_PIXEL_CHANNELS = 8


def conv2d_pair(data, packed, geometry: Geometry):
    """The compute above: ``data`` NHWC uint8/int8, ``packed`` int8 ``[kh, kw, ic/16, oc, 16]``."""
    from tvm import te

    window = Window(data, packed, geometry)
    half = te.reduce_axis((0, 2), name="rh")
    even = te.reduce_axis((0, 2), name="re")
    ry, rx, block = window.ry, window.rx, window.group

    def compute(n, y, x, f, lane):
        channel = 2 * lane + even + 8 * half
        pixel = window.pixel(n, y, x, block * BLOCK + channel)
        weight = packed[ry, rx, block, f, channel]
        return te.sum(pixel.astype("int32") * weight.astype("int32"), axis=[ry, rx, block, half, even])

    partial = te.compute((data.shape[0], *geometry.out_size, window.filters, LANES), compute, name=ANCHOR)
    return te.compute(partial.shape[:4], lambda n, y, x, f: partial[n, y, x, f, 0] + partial[n, y, x, f, 1]
                      + partial[n, y, x, f, 2] + partial[n, y, x, f, 3], name=SUM)  # fmt: skip


def register_pair_intrin() -> str:
    """Register (once) and name the tensor intrinsic ``C[l] += sum_{h, e} A[2l + e + 8h] * B[2l + e + 8h]``
    (A, B int8 [16], C int32 [4]): ``smull`` of the low halves, the high halves' product added in
    int16 (``smlal2``), ``saddlp`` added to C (``sadalp``), as one expression (a named value would be
    a buffer of its own)."""
    return _register(PAIR_INTRIN, _pair_function)


def register_lane_sum() -> str:
    """Register (once) and name the tensor intrinsic ``C[i] = A[i, 0] + A[i, 1] + A[i, 2] + A[i, 3]``
    (A int32 [4, 4]: 4 accumulators, C int32 [4]): two ``addp`` of pairs of accumulators and one of
    their results (LLVM's own code for the sum moved lanes one at a time: ~60 instructions per 16
    outputs against 12)."""
    return _register(SUM_INTRIN, _lane_sum_function)


def _register(name: str, function) -> str:
    """Register ``function(False)`` (the description) and ``function(True)`` (the implementation) as
    the tensor intrinsic ``name``, once."""
    from tvm.s_tir import TensorIntrin

    try:
        TensorIntrin.get(name)
    except ValueError:
        TensorIntrin.register(name, function(False), function(True))
    return name


def _llvm(name: str, *args, dtype: str):
    from tvm.script import tirx as T

    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), *args, dtype=dtype)


def _pair_function(implementation: bool):
    """The pair intrinsic's description or (``implementation``) implementation."""
    from tvm.script import tirx as T

    def smull(A, B, low: int):
        return _llvm("llvm.aarch64.neon.smull.v8i16", T.Shuffle([A.vload([0], dtype="int8x16")], list(range(low, low + 8))),
                     T.Shuffle([B.vload([0], dtype="int8x16")], list(range(low, low + 8))), dtype="int16x8")  # fmt: skip

    @T.prim_func(s_tir=True)
    def function(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (BLOCK,), dtype="int8", offset_factor=1)
        B = T.match_buffer(b, (BLOCK,), dtype="int8", offset_factor=1)
        C = T.match_buffer(c, (LANES,), dtype="int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:BLOCK], B[0:BLOCK])
            T.writes(C[0:LANES])
            if implementation:
                C[T.ramp(T.int32(0), 1, LANES)] = C.vload([0], dtype="int32x4") + _llvm(
                    "llvm.aarch64.neon.saddlp.v4i32.v8i16", smull(A, B, 0) + smull(A, B, 8), dtype="int32x4")
            else:
                for lane, half, even in T.grid(LANES, 2, 2):
                    with T.sblock("update"):
                        vl, vh, ve = T.axis.remap("SRR", [lane, half, even])
                        C[vl] = C[vl] + T.Cast("int32", A[2 * vl + ve + 8 * vh]) * T.Cast("int32", B[2 * vl + ve + 8 * vh])

    return function


def _lane_sum_function(implementation: bool):
    """The lane sum intrinsic's description or (``implementation``) implementation."""
    from tvm.script import tirx as T

    def addp(first, second):
        return _llvm("llvm.aarch64.neon.addp.v4i32", first, second, dtype="int32x4")

    @T.prim_func(s_tir=True)
    def function(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (LANES, LANES), dtype="int32", offset_factor=1)
        C = T.match_buffer(c, (LANES,), dtype="int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:LANES, 0:LANES])
            T.writes(C[0:LANES])
            if implementation:
                C[T.ramp(T.int32(0), 1, LANES)] = addp(
                    addp(A.vload([0, 0], dtype="int32x4"), A.vload([1, 0], dtype="int32x4")),
                    addp(A.vload([2, 0], dtype="int32x4"), A.vload([3, 0], dtype="int32x4")))  # fmt: skip
            else:
                for i in range(LANES):
                    with T.sblock("sum"):
                        vi = T.axis.remap("S", [i])
                        C[vi] = A[vi, 0] + A[vi, 1] + A[vi, 2] + A[vi, 3]

    return function


def pair_tile(rows: list[int], filters: int, registers: int = 32) -> tuple[list[int], int]:
    """(pixel factors of ``rows``, output channels) of the register tile: the most MACs per
    instruction per block, ``16 p f / (3 p f + 2 p + f)`` (3 per product, a load and an ``eor`` per
    pixel, a load per output channel), ``p f <= MAX_ACCUMULATORS`` and ``p f + p + f + 2 <= registers``;
    output channels a multiple of 4 (the epilogue's vectors)."""
    best = None
    for channels in (c for c in divisors(filters) if c % LANES == 0):
        for height in divisors(rows[0]):
            for width in divisors(rows[1]):
                points = height * width
                if points == 1 and channels > MAX_SINGLE_PIXEL_CHANNELS:
                    continue
                if points * channels > MAX_ACCUMULATORS or points * channels + points + channels + 2 > registers:
                    continue
                score = (points * channels / (3 * points * channels + 2 * points + channels), width)
                if best is None or score > best[0]:
                    best = (score, [height, width], channels)
    return (best[1], best[2]) if best else ([1, 1], LANES)


class Conv2DPair(Rule):
    """The schedule of the kernels above (blocks ``conv2d_nhwc_pair_partial``)::

        parallel  (n, y/Y, x/X, f/F)  or (f/F, n, y/Y, x/X) when the weights are the bigger operand
          init      partial[Y, X, F, 4] = 0
          for ry, rx, b:                                 (reduction, b: blocks of 16 channels)
            signed[Y, X, 16] = x[..., 16 channels] ^ 0x80   (one 16-byte load + eor per pixel)
            for Y, X, F: (unrolled)
              partial[y, x, f, 0:4] = smull/smlal2/sadalp(signed[y, x, 0:16], P[ry, rx, b, f, 0:16])
          epilogue  out[Y, X, F] = requantize(sum of partial's lanes)

    A convolution that pads its input writes ``signed`` once, whole, and copies the tile's 16
    channels from it per block (conv2d_dot.py does the same)."""

    name = "conv2d-pair"

    def apply(self, func):
        sch, anchor = self.schedule_reduction(func, ANCHOR)
        if anchor is None:
            return None
        signed = sch.get_sblock(SIGNED)
        lane_sum = sch.get_sblock(SUM)
        epilogue = inline_epilogue(sch, lane_sum)  # the requantization, one block
        inline_producers(sch, signed)
        n, y, x, f = sch.get_loops(epilogue)
        _, height, width, filters = extents(sch, [n, y, x, f])
        (tile_y, tile_x), tile_f = pair_tile([height, width], filters, self.vector.registers)
        (y_outer, x_outer, f_outer), (y_inner, x_inner, f_inner) = split_tiles(sch, [y, x, f], [tile_y, tile_x, tile_f])
        stmt = sch.get(anchor)
        data = sch.get(signed).writes[0].source
        weight = next(r.source for r in stmt.reads if not r.source.same_as(data) and not r.source.same_as(stmt.writes[0].source))
        outer = [f_outer, n, y_outer, x_outer] if buffer_size(weight) > buffer_size(data) else [n, y_outer, x_outer, f_outer]
        sch.reorder(*outer, y_inner, x_inner, f_inner)
        fused = parallel_outer(sch, outer, block_work(sch, anchor))
        # the lane sums and the partial sums computed per tile, where the epilogue reads them (the
        # lane sum reads constant lanes: computed at its consumer, not the consumer at the producer)
        if epilogue is not lane_sum:
            sch.compute_at(lane_sum, fused, preserve_unit_loops=True)
        sch.compute_at(anchor, fused, preserve_unit_loops=True)
        y_inner, x_inner, f_inner, lane, ry, rx, block, half, even = sch.get_loops(anchor)[-9:]
        sch.reorder(ry, rx, block, y_inner, x_inner, f_inner, lane, half, even)
        if epilogue is not lane_sum:
            vectorize_innermost(sch, sch.get_loops(epilogue)[-1], self.vector.lanes)
        *sum_tile, sum_channels = sch.get_loops(lane_sum)[-3:]
        sum_channels, four = sch.split(sum_channels, [None, LANES])
        for loop in (*sum_tile, sum_channels):
            sch.unroll(loop)
        sch.tensorize(four, register_lane_sum())
        if pads(sch, signed):
            schedule_injective(sch, signed, self.vector.lanes_of("int8"))
            signed = sch.cache_read(anchor, read_index(sch, anchor, data), "global")
        copy_at(sch, anchor, signed, block)
        for loop in (y_inner, x_inner, f_inner):
            sch.unroll(loop)
        split_init(sch, anchor, ry, 3)
        sch.tensorize(lane, register_pair_intrin())
        return sch
