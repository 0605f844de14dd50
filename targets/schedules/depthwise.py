"""Depthwise 2-D convolution, channels last: one input channel per group
(``groups == channels``), any kernel size, stride and dilation, with its fused
element-wise epilogue.

The legalized kernel is ``out[n, y, x, c] += pad[n, y*s + ry, x*s + rx, c] *
w[ry, rx, 0, c]``. Every load is a contiguous channel vector, so the schedule
vectorises channels and register-tiles output pixels along a row:

    parallel  (n, y/Y, x/X, c/C)
      init      acc[Y, X, C] = 0
      for ry, rx:                                      (reduction, the taps)
        for Y, X: (unrolled)  for C: (vectorised)
          acc[y, x, c] += pad[n, y*s + ry, x*s + rx, c] * w[ry, rx, 0, c]
      epilogue  out[Y, X, C] = g(acc)

Padding is inlined into the loads.
"""

from __future__ import annotations

from edgec.targets.schedules.common import (
    Rule,
    block_work,
    extents,
    inline_epilogue,
    inline_producers,
    parallel_outer,
    register_tile,
    schedule_epilogue,
    schedule_injective,
    single_reduction,
)
from edgec.targets.schedules.conv2d import conv_operands, finish_register_tile, padding_block


class DepthwiseConv2DNHWC(Rule):
    """``materialise_padding``: write the zero-padded input once instead of testing
    the border in every load, as conv2d.py does. Off by default: a depthwise
    layer is bound by memory traffic, which the extra copy adds to (measured
    1.0-2.2x slower on MobileNetV2's layers with AVX-512), while the border
    test costs little next to a vector load."""

    name = "depthwise-conv2d-nhwc"

    def __init__(self, vector, materialise_padding: bool = False):
        super().__init__(vector)
        self.materialise_padding = materialise_padding

    def apply(self, func):
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        anchor, _ = single_reduction(sch)
        if anchor is None or not sch.get(anchor).name_hint.startswith("group_conv2d_nhwc"):
            return None
        if conv_operands(sch, anchor, depthwise=True) is None:
            return None
        epilogue = inline_epilogue(sch, anchor)
        if epilogue is anchor:
            epilogue = sch.cache_write(anchor, 0, "global")
        padding = padding_block(sch, anchor)
        if padding is not None and self.materialise_padding:
            inline_producers(sch, anchor, keep={sch.get(padding).name_hint})
            schedule_injective(sch, padding, self.vector.lanes)
        else:
            inline_producers(sch, anchor)
        n, y, x, c, ry, rx, rc = sch.get_loops(anchor)
        _, height, width, channels = extents(sch, [n, y, x, c])
        (tile_y, tile_x), tile_c = register_tile([height, width], channels, self.vector, max_vectors=2)
        y_outer, y_inner = sch.split(y, [None, tile_y])
        x_outer, x_inner = sch.split(x, [None, tile_x])
        c_outer, c_inner = sch.split(c, [None, tile_c])
        outer = [n, y_outer, x_outer, c_outer]
        sch.reorder(*outer, ry, rx, rc, y_inner, x_inner, c_inner)
        fused = parallel_outer(sch, outer, block_work(sch, anchor))
        schedule_epilogue(sch, epilogue, fused, self.vector.lanes)
        sch.unroll(rx)
        finish_register_tile(sch, anchor, ry, [y_inner, x_inner], c_inner, self.vector.lanes)
        return sch
