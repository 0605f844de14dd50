"""Depthwise 2-D convolution, channels last: one input channel per group
(``groups == channels``), any kernel size, stride and dilation, with its fused
element-wise epilogue.

The legalized kernel is ``out[n, y, x, c] += pad[n, y*s + ry, x*s + rx, c] *
w[ry, rx, 0, c]``. Every load is a contiguous channel vector, so the schedule
vectorises channels and register-tiles output pixels along one row:

    parallel  (n, y)                                   (partitioned)
      for x/X:                                         (partitioned)
        for c/C:
          init      acc[X, C] = 0
          for ry, rx:                                  (reduction, the taps, unrolled)
            for X: (unrolled)  for C: (vectorised)
              acc[x, c] += pad[n, y*s + ry, x*s + rx, c] * w[ry, rx, 0, c]
          epilogue  out[X, C] = g(acc)

Padding is inlined into the loads as a border test. The row and column tile
loops carry ``pragma_loop_partition_hint``: TVM's LoopPartition (in the default
TIR pipeline) splits each into the tiles that touch the border, which keep the
test, and the interior ones, whose loads go straight (aarch64: no compare and
branch per load). One row per tile: two rows per tile (2x4 points) ran 1.39
instructions per MAC on MobileNetV2's 28x28x192 layer on cortex-a53, one row
(1x7) 0.65; the taps unrolled in TIR (rows too, not only columns) 0.58, the
depthwise layers together 0.75 -> 0.64. The unrolled taps' weights (9 per channel
vector of the tile) stay in registers beside the accumulators: with a 32-register
file a 2-vector tile of 3x3 taps gets at most 32 - 18 = 14 accumulators (7 points,
where 8 points spilled and moved registers: MobileNetV2's 56x56x144 layer 2.92M
-> 2.44M instructions on cortex-a53, the depthwise layers 13.26M -> 12.33M).

Integer kernels with int16 weights (qdq_integer.weight_dtype: NEON's lane multiply-add) vectorise
the channels 8 lanes at a time, one int16 register (``lanes_of("int16")``): per tap and 8 channels
``ldr d`` + ``uxtl`` of the activations and ``smlal`` + ``smlal2`` into two int32 accumulators. At 4
lanes (the float32 vector) LLVM assembled the 4-byte loads of neighbouring taps into byte vectors
lane by lane (``umov``/``mov v.b[i]``/``tbl``: 1.68 instructions per MAC in the interior loop of
MobileNetV2's 56x56x144 layer on cortex-a53; 0.52 at 8 lanes).
"""

from __future__ import annotations

from edgec.targets.schedules.common import (
    Rule,
    arithmetic_operations,
    border_partitioned_nest,
    epilogue_block,
    extents,
    register_tile,
    split_tiles,
)
from edgec.targets.schedules.conv2d import conv_operands, finish_register_tile, inline_inputs
from edgec.targets.schedules.fold_adds import fold_epilogue_adds, folds_adds


MAX_VECTORS = 2  # channel vectors per tile
MIN_CAPPED_ACCUMULATORS = 8  # a smaller register file (16: armv7, AVX2) keeps the plain budget
# Without a lane multiply-add (x86): an epilogue of at least HEAVY_EPILOGUE_OPERATIONS per element
# (a SiLU: fast_math's sigmoid and the multiply, about 70 counted; ReLU 2, hard swish under 10) gets
# a tile of one channel vector and at most HEAVY_EPILOGUE_ACCUMULATORS pixels. The wide tile kept its
# taps' weights and accumulators in registers through the epilogue's temporaries and moved them
# through the stack (EfficientNet-B0's 3x3 112x112x32 layer: 317 vmovups/vmovaps); with SiLU,
# AVX-512, one thread: 112x112x32 (3x3) 0.41 -> 0.17 ms, 56x56x144 (3x3) 0.27 -> 0.19, 14x14x672
# (5x5) 0.26 -> 0.095. Without the SiLU the tile choice hardly matters there (0.05-0.11 ms).
HEAVY_EPILOGUE_OPERATIONS = 16
HEAVY_EPILOGUE_ACCUMULATORS = 8


class DepthwiseConv2DNHWC(Rule):
    """``materialise_padding``: write the zero-padded input once instead of testing
    the border in every load, as conv2d.py does. Off by default: a depthwise
    layer is bound by memory traffic, which the extra copy adds to (measured
    1.0-2.2x slower on MobileNetV2's layers with AVX-512), while the border
    test costs little next to a vector load."""

    name = "depthwise-conv2d-nhwc"
    materialise_padding = False

    def apply(self, func):
        sch, anchor = self.schedule_reduction(func, "group_conv2d_nhwc")
        operands = None if anchor is None else conv_operands(sch, anchor, depthwise=True)
        if operands is None:
            return None
        data, weight = operands
        lanes = self.vector.lanes
        if data.dtype in ("uint8", "int8") and weight.dtype == "int16":
            lanes = self.vector.lanes_of("int16")  # one int16 register (module docstring)
        if folds_adds(self.vector):
            fold_epilogue_adds(sch, anchor)
        epilogue = epilogue_block(sch, anchor, self.vector.lanes)
        inline_inputs(sch, anchor, self.vector.lanes, self.materialise_padding)
        n, y, x, c, ry, rx, rc = sch.get_loops(anchor)
        _, height, width, channels = extents(sch, [n, y, x, c])
        taps = extents(sch, [ry])[0] * extents(sch, [rx])[0]
        beside_weights = self.vector.registers - MAX_VECTORS * taps  # a 2-vector tile's weights held
        cap = beside_weights if beside_weights >= MIN_CAPPED_ACCUMULATORS else None
        vectors = MAX_VECTORS
        if not self.vector.lane_fma and arithmetic_operations(sch, epilogue) >= HEAVY_EPILOGUE_OPERATIONS:
            vectors, cap = 1, HEAVY_EPILOGUE_ACCUMULATORS
        (tile_x,), tile_c = register_tile([width], channels, self.vector, max_vectors=vectors, max_accumulators=cap)
        tile_y = 1
        outer, (y_inner, x_inner, c_inner) = split_tiles(sch, [y, x, c], [tile_y, tile_x, tile_c])
        y_outer, x_outer, c_outer = outer
        border_partitioned_nest(
            sch, anchor, epilogue, [n, y_outer, x_outer, c_outer], [ry, rx], [rc, y_inner, x_inner, c_inner], self.vector.lanes
        )
        finish_register_tile(sch, anchor, ry, [y_inner, x_inner], c_inner, lanes)
        return sch
