"""2-D convolution, channels last (NHWC data, HWIO weights), any kernel size,
stride and dilation, groups = 1; with its fused element-wise epilogue.

The legalized kernel is ``out[n, y, x, f] += pad[n, y*s + ry, x*s + rx, rc] *
w[ry, rx, rc, f]`` followed by the epilogue (BN scale/shift, bias, clip,
residual add). Schedule, outermost first:

    parallel  (n, y/Y, x/X, f/F)  or (f/F, n, y/Y, x/X) when the weights are
              the bigger operand (they then stay in cache across pixel tiles)
      init      acc[Y, X, F] = 0                       (vectorised over F)
      for ry, rx, rc:                                  (reduction)
        for Y, X:  (unrolled)  for F: (vectorised)
          acc[y, x, f] += pad[...] (broadcast) * w[ry, rx, rc, f]
      epilogue  out[Y, X, F] = g(acc)                  (vectorised over F)

The register tile ``Y x X x F`` is picked by ``common.register_tile``: F a
whole number of vectors dividing the output channels, Y and X dividing the
output height and width (on AVX-512 X may leave a partial last tile where no
dividing one does a multiply-add per load: 7 of a 13-pixel row, its column
tiles then a partitioned loop of their own, ``RAGGED_TILE_REGISTERS``),
Y*X*F/lanes accumulators within the register file.
Padding is written once into a padded copy of the input (parallel,
vectorised) for kernels larger than 1x1. On CPUs with a lane multiply-add
(aarch64) the tile's input pixels are loaded ``lanes`` channels at a time
and read lane by lane (``common.lane_broadcast``) instead of one broadcast
per channel, when ``lanes`` divides the input channels and the input is not
padded in the loads. With fewer input channels than lanes (an RGB stem) the
pixels a tile reads for one kernel row are copied instead, a vectorised run
of columns x channels, and read by lane (``stage_input_rows``). On those CPUs the
weights may come packed by the tile's output channels, ``P[f // T, ry, rx, rc, f % T]``
(packed_weights.py), read through an inlined view: scheduled the same way.
"""

from __future__ import annotations

from edgec.targets.schedules.common import (
    Rule,
    buffer_size,
    epilogue_block,
    extents,
    inline_producers,
    lane_broadcast,
    register_tile,
    schedule_injective,
    split_init,
    split_tiles,
    static_iter_kinds,
    tile_nest,
    wants_lane_broadcast,
)
from edgec.targets.schedules.fold_adds import fold_epilogue_adds, folds_adds


def conv_regions(sch, block):
    """(iter vars, data region, weight region) when ``block`` is a channels-last convolution's
    contraction, ``out[n, y, x, f] += data[n, ., ., .] * w[ry, rx, rc, f]`` over static
    ``SSSSRRR`` iters, else None; what indexes the data's channel is left to the caller."""
    stmt = sch.get(block)
    if static_iter_kinds(sch, block) != "SSSSRRR":
        return None
    n, y, x, f, ry, rx, rc = iters = tuple(iv.var for iv in stmt.iter_vars)
    if len(stmt.writes) != 1 or not _indexed_by(stmt.writes[0], [n, y, x, f]):
        return None
    reads = [
        region for region in stmt.reads
        if not region.source.same_as(stmt.writes[0].source) and not _spatial_only(region, [n, y, x, f])
    ]  # fmt: skip
    if len(reads) != 2:
        return None
    data, weight = reads
    if not (_indexed_by(weight, [ry, rx, rc, f]) or packed_tile(weight, [ry, rx, rc, f])) or len(data.region) != 4:
        return None
    return iters, data, weight


def packed_tile(region, variables) -> int | None:
    """The output-channel tile ``T`` when ``region`` reads weights packed by it
    (``w[f // T, ry, rx, rc, f % T]``, ``packed_weights``), else None."""
    from tvm import tirx

    ry, rx, rc, f = variables
    if len(region.region) != 5 or any(int(r.extent) != 1 for r in region.region):
        return None
    block, ry_, rx_, rc_, lane = (r.min for r in region.region)
    if not (ry_.same_as(ry) and rx_.same_as(rx) and rc_.same_as(rc)):
        return None
    if not (isinstance(block, tirx.FloorDiv) and isinstance(lane, tirx.FloorMod)):
        return None
    if not (block.a.same_as(f) and lane.a.same_as(f) and isinstance(block.b, tirx.IntImm)):
        return None
    tile = int(block.b)
    return tile if isinstance(lane.b, tirx.IntImm) and int(lane.b) == tile else None


def conv_operands(sch, block, depthwise: bool = False):
    """(data buffer, weight buffer) when ``block`` is an NHWC/HWIO convolution, else None.

    Checked on the access pattern, not only the name (``conv_regions``): the output is
    indexed ``[n, y, x, f]`` by the four spatial iters, the weight ``[ry, rx, rc, f]``
    and the data's last index is ``rc`` (``f + rc`` for depthwise).
    """
    from tvm import tirx

    regions = conv_regions(sch, block)
    if regions is None:
        return None
    (_, _, _, f, _, _, rc), data, weight = regions
    channel = data.region[3].min
    if depthwise:
        # group conv with one input channel per group: data[..., f + rc], rc of extent 1
        if int(sch.get(block).iter_vars[6].dom.extent) != 1 or not isinstance(channel, tirx.Add):
            return None
        if not (channel.a.same_as(f) and channel.b.same_as(rc)):
            return None
    elif not channel.same_as(rc):
        return None
    return data.source, weight.source


def _spatial_only(region, spatial) -> bool:
    """Whether ``region`` is indexed by constants and spatial iters only: an addition folded
    into the accumulators' init (``fold_adds``), not an operand of the contraction."""
    from tvm import tirx

    return all(
        isinstance(r.min, tirx.IntImm) or any(r.min.same_as(v) for v in spatial) for r in region.region
    )  # fmt: skip


def _indexed_by(region, variables) -> bool:
    return len(region.region) == len(variables) and all(
        r.min.same_as(v) and int(r.extent) == 1 for r, v in zip(region.region, variables, strict=True)
    )


# accumulators of a register tile whose taps are unrolled (Conv2DNHWC.unroll_taps): half the
# register file, the other half for the taps' inputs and weights
UNROLLED_TAPS_ACCUMULATORS = 16
# accumulators of a tile whose inputs are broadcast one value at a time (no lane multiply-add:
# x86, armv7, whose 16 registers hold fewer anyway). AVX-512's budget is 24, and its 2 x 4 pixel x
# 3 vector tile (EfficientNet-B0's 28x28 40 -> 240 1x1 with SiLU, MobileNetV3-small's 28x28
# 24 -> 96 ones) compiled to an accumulator LLVM copies through the stack (138 vmovups in the
# kernel against 28 for the 1 x 7 x 3 tile): 0.37 -> 0.21 ms per call with 1 x 7 x 3 (21), the
# MobileNetV3 ones 0.95x; the 1 x 8 x 3 tiles it also replaces by 1 x 7 x 3 ran the same (1.01x).
BROADCAST_TILE_ACCUMULATORS = 21

# ragged register tiles (``register_tile(ragged=True)``) on CPUs with at least this many vector
# registers: AVX-512, where SqueezeNet's 13x13 1x1 layers ran 1.10-1.22x faster with them (its
# 1000-class 13x13x512 classifier 1.10 -> 0.91 ms, one thread, `bench/layers_vs_ort.py`). On armv7
# (16 registers) they replaced MobileNetV2's 7x7 tiles of 7 pixels x 1 vector by 3 x 4 and its
# cortex-a7 build ran more instructions (258,456,308 -> 264,843,665 per inference): not used there,
# nor on CPUs with the lane multiply-add (aarch64), where it was not measured.
RAGGED_TILE_REGISTERS = 32

# a reduction of at most this many lane steps (``lane_broadcast``) LLVM unrolls by 2 and pairs
# the two steps' input loads into ``ldp``: both steps' inputs are live beside the accumulators
PAIRED_LANE_STEPS = 8


def conv_tile(vector, rows: list[int], channels: int, depth: int, unroll_taps: bool, materialised: bool | None = True):
    """How ``Conv2DNHWC`` tiles a convolution of ``depth`` input and ``channels`` output channels
    whose output is ``rows`` (height, width): ``(lane, unroll, staged, register tile)``, whether
    it reads its input by lane (``lane_broadcast``), unrolls a kernel row's taps (``unroll_taps``)
    and stages their input (``stage_input_rows``), and ``common.register_tile``'s choice.
    ``materialised``: the padding (``inline_inputs``; False: a border test inlined into the loads,
    which cannot be copied as a whole vector)."""
    lane = wants_lane_broadcast(vector, depth) and materialised is not False
    unroll = not lane and depth < vector.lanes and unroll_taps
    staged = unroll and materialised is not False
    cap = UNROLLED_TAPS_ACCUMULATORS if unroll else None if lane or vector.lane_fma else BROADCAST_TILE_ACCUMULATORS
    copies = 2 if lane and depth // vector.lanes <= PAIRED_LANE_STEPS else 1
    ragged = not (lane or unroll or vector.lane_fma) and vector.registers >= RAGGED_TILE_REGISTERS
    tile = register_tile(rows, channels, vector, lane_operand=lane or staged, max_accumulators=cap, lane_copies=copies,
                         ragged=ragged)  # fmt: skip
    return lane, unroll, staged, tile


class Conv2DNHWC(Rule):
    """Register-tiled direct convolution: pixels x output channels, vectorised over channels.

    ``materialise_padding``: for kernels larger than 1x1, write the zero-padded
    input once (a parallel, vectorised copy) instead of testing the border
    in every broadcast load of the inner loop (measured up to 2.3x faster on
    ResNet-18's 3x3 layers with AVX-512; the copy is small next to the
    kh*kw*C multiply-adds per output).

    ``unroll_taps``: with fewer input channels than a vector's lanes (an RGB
    stem), unroll a kernel row's taps and channels into one loop body instead
    of a loop of ``C`` register-tile steps each paying the loop's own
    instructions. On CPUs with a lane multiply-add (aarch64), where it was
    measured (ResNet-18's 7x7 stem on cortex-a53: 1.54 -> 1.40 instructions
    per fmla in the inner loop); LLVM's AVX-512 code for the unrolled stem moves
    36 vectors through the stack, so x86 keeps the loop. The unrolled taps hold
    their inputs and weights in registers beside the tile: at most
    ``UNROLLED_TAPS_ACCUMULATORS`` accumulators (ShuffleNetV2's 3x3/2 stem, 3 -> 24
    channels, on cortex-a53: the 8-point x 3-vector tile, 24 accumulators, spilled
    to the stack in every row of taps, 4.66M instructions; 4 x 3, 4.13M).
    The tile's input for one kernel row is then staged (``stage_input_rows``) and
    read by lane, so the tile is chosen as for lane operands (wider rows of pixels:
    ResNet-18's 7x7/2 stem, 1 x 4 pixels x 16 channels -> 1 x 8 x 8; ShuffleNetV2's,
    4 x 3 vectors -> 8 x 2, 4.13M -> 3.75M instructions).
    """

    name = "conv2d-nhwc"
    materialise_padding = True

    @property
    def unroll_taps(self) -> bool:
        return self.vector.lane_fma

    @property
    def fold_adds(self) -> bool:
        """Start the accumulators at the bias (and shortcut) added after the convolution
        (``fold_adds``)."""
        return folds_adds(self.vector)

    def apply(self, func):
        sch, anchor = self.schedule_reduction(func, "conv2d_nhwc")
        operands = conv_operands(sch, anchor) if anchor is not None else None
        if operands is None:
            return None
        data, weight = operands
        if self.fold_adds:
            fold_epilogue_adds(sch, anchor)
        epilogue = epilogue_block(sch, anchor, self.vector.lanes)
        n, y, x, f, ry, rx, rc = sch.get_loops(anchor)
        materialise = self.materialise_padding and extents(sch, [ry, rx]) != [1, 1]
        materialised = inline_inputs(sch, anchor, self.vector.lanes, materialise)
        _, height, width, channels, depth = extents(sch, [n, y, x, f, rc])
        lane, unroll, staged, ((tile_y, tile_x), tile_f) = conv_tile(
            self.vector, [height, width], channels, depth, self.unroll_taps, materialised
        )
        (y_outer, x_outer, f_outer), (y_inner, x_inner, f_inner) = split_tiles(sch, [y, x, f], [tile_y, tile_x, tile_f])
        weight_stationary = buffer_size(weight) > buffer_size(data)
        inner = [ry, rx, rc, y_inner, x_inner, f_inner]
        if width % tile_x:  # a ragged column tile (conv_tile): the column tiles' loop apart, partitioned
            outer = [f_outer, n, y_outer] if weight_stationary else [n, y_outer, f_outer]
            tile_nest(sch, anchor, epilogue, outer, inner, self.vector.lanes, partitioned=x_outer)
        else:
            outer = [f_outer, n, y_outer, x_outer] if weight_stationary else [n, y_outer, x_outer, f_outer]
            tile_nest(sch, anchor, epilogue, outer, inner, self.vector.lanes)
        if lane:
            rc = lane_broadcast(sch, anchor, rc, self.vector.lanes) or rc
        elif unroll:
            sch.unroll(rx)
            sch.unroll(rc)
            if staged:
                stage_input_rows(sch, anchor, ry)
        finish_register_tile(sch, anchor, ry, [y_inner, x_inner], f_inner, self.vector.lanes)
        return sch


def stage_input_rows(sch, anchor, kernel_row) -> None:
    """Copy what a register tile of a few-channel convolution reads for one kernel row
    into a small buffer at ``kernel_row`` (the loop over the kernel's rows): per output
    row, the tile's input columns x channels are one contiguous run (a 7x7/2 stem's 8
    pixels x 3 channels: 21 + 6 * 7 = 63 floats), copied as one vectorised load; LLVM
    drops the copy, loads those vectors from the input into registers and the unrolled
    taps read them by lane (aarch64 ``fmla v.4s, v.4s, v.s[i]``) where they loaded one
    scalar per tap, pixel and channel (ResNet-18's stem on cortex-a53: 1.40 -> 1.17
    instructions per fmla in the inner loop, 42.7M -> 35.9M instructions)."""
    stmt = sch.get(anchor)
    data = conv_regions(sch, anchor)[1].source
    index = next(i for i, region in enumerate(stmt.reads) if region.source.same_as(data))
    cached = sch.cache_read(anchor, index, "global")
    sch.compute_at(cached, kernel_row, preserve_unit_loops=True)
    *rows, columns, channels = sch.get_loops(cached)[-4:]  # the copy of [n, rows, columns, channels]
    sch.vectorize(sch.fuse(columns, channels))
    for loop in rows:
        sch.unroll(loop)


def finish_register_tile(sch, anchor, first_reduction, unrolled, vectorised, lanes: int) -> None:
    """Unroll the tile's row loops and vectorise its channel loop one register
    (``lanes``) at a time, the registers of a row unrolled: LLVM keeps an
    accumulator tile of whole ``<lanes x float>`` values in registers, where
    one long vector (``<48 x float>``) would be spilled and shuffled through
    the stack. Then split the accumulator's initialisation out in front of
    ``first_reduction``, likewise."""
    extent = int(sch.get(vectorised).extent)
    if extent > lanes and extent % lanes == 0:
        registers, vectorised = sch.split(vectorised, [None, lanes])
        unrolled = [*unrolled, registers]
    if extent > 1:
        sch.vectorize(vectorised)
    for loop in unrolled:
        sch.unroll(loop)
    split_init(sch, anchor, first_reduction, len(unrolled), extent > 1)


def inline_inputs(sch, anchor, lanes: int, materialise_padding: bool) -> bool | None:
    """Inline the anchor's producers; with ``materialise_padding``, except the padding
    block when there is one, which then writes the padded input once (parallel, vectorised).
    Returns None when the input is not padded, else whether the padding was materialised
    (False: the border test is inlined into the anchor's loads)."""
    padding = padding_block(sch, anchor)
    if padding is None or not materialise_padding:
        inline_producers(sch, anchor)
        return None if padding is None else False
    inline_producers(sch, anchor, keep={sch.get(padding).name_hint})
    schedule_injective(sch, padding, lanes)
    return True


def padding_block(sch, anchor):
    """The block writing the anchor's data operand when it pads (an ``if_then_else`` border)."""
    import tvm

    has_if_then_else = tvm.get_global_func("s_tir.schedule.HasIfThenElse")
    for producer in sch.get_producers(anchor):
        if has_if_then_else(sch.get(producer)):
            return producer
    return None
