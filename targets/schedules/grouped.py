"""Grouped 2-D convolution, channels last (NHWC data, HWIO weights), ``1 < groups <
channels``: RegNet's group widths 8, 16, 24..., ResNeXt's 32x4d; with its fused
element-wise epilogue.

The legalized kernel (TOPI's ``group_conv2d_nhwc``) is ``out[n, y, x, f] +=
pad[n, y*s + ry, x*s + rx, f // F_g * C_g + rc] * w[ry, rx, rc, f]`` for ``F_g``
output and ``C_g`` input channels per group. Once the output channel axis is
split into (group, channel of the group), a group is a dense convolution of its
own: for a fixed group the data's channel is ``g * C_g + rc``, one broadcast
value per pixel and reduction step, and the weights are a contiguous run of
``F_g`` output channels. So the schedule is conv2d.py's, over a group axis:

    parallel  (n, y/Y, x/X, g, f_g/F)  or (g, f_g/F, n, y/Y, x/X) when the weights
              are the bigger operand
      init      acc[Y, X, F] = 0                                (vectorised over F)
      for ry, rx, rc:                                           (reduction, C_g deep)
        for Y, X:  (unrolled)  for F: (vectorised)
          acc[y, x, f] += pad[..., g*C_g + rc] (broadcast) * w[ry, rx, rc, g*F_g + f]
      epilogue  out[Y, X, F] = g(acc)                           (vectorised over F)

The register tile ``Y x X x F`` is ``common.register_tile`` of the group's
``F_g`` output channels: whole vectors when they divide ``F_g``, else the
largest power of two below a vector that does (group width 8 with AVX-512:
8-lane vectors; 24: 8 lanes, 3 of them). Vectorising across groups instead
(one vector covering two groups of 8) would need each lane's input value from
its own group, a two-value broadcast per step (a shuffle on x86, lane inserts on
NEON) for every multiply-add vector; the half-width vector keeps the loads of
the groups-1 kernel. Padding is materialised for kernels larger than 1x1 as in
conv2d.py; on aarch64 the pixels' input channels are loaded ``lanes`` at a time
and read by lane (``common.lane_broadcast``) when ``lanes`` divides ``C_g``.

Depthwise convolutions (``C_g = F_g = 1``, ``pad[..., f + rc]``) are not matched:
depthwise.py schedules them.
"""

from __future__ import annotations

from edgec.targets.schedules.common import (
    Rule,
    buffer_size,
    epilogue_block,
    extents,
    lane_broadcast,
    register_tile,
    split_tiles,
    tile_nest,
    wants_lane_broadcast,
)
from edgec.targets.schedules.conv2d import conv_regions, finish_register_tile, inline_inputs


def grouped_operands(sch, block):
    """(data, weight, output channels per group) when ``block`` is a grouped NHWC/HWIO
    convolution with more than one output channel per group, else None.

    Checked on the access pattern: output ``[n, y, x, f]``, weight ``[ry, rx, rc, f]``,
    data's channel ``f // F_g * C_g + rc`` (``f // F_g + rc`` when ``C_g`` is 1) with
    ``C_g`` the extent of ``rc``, ``F_g`` dividing the output channels and smaller than them.
    """
    from tvm import tirx

    regions = conv_regions(sch, block)
    if regions is None:
        return None
    (_, _, _, f, _, _, rc), data, weight = regions
    stmt = sch.get(block)
    channel = data.region[3].min
    if not isinstance(channel, tirx.Add) or not channel.b.same_as(rc):
        return None
    group, depth = channel.a, int(stmt.iter_vars[6].dom.extent)
    if isinstance(group, tirx.Mul) and isinstance(group.b, tirx.IntImm) and int(group.b) == depth:
        group = group.a
    elif depth != 1:
        return None
    if not isinstance(group, tirx.FloorDiv) or not group.a.same_as(f) or not isinstance(group.b, tirx.IntImm):
        return None
    per_group, channels = int(group.b), int(stmt.iter_vars[3].dom.extent)
    if per_group < 2 or per_group >= channels or channels % per_group:
        return None
    return data.source, weight.source, per_group


class GroupedConv2DNHWC(Rule):
    """Register-tiled direct convolution per group: pixels x a group's output channels,
    vectorised over those channels (module docstring)."""

    name = "grouped-conv2d-nhwc"
    materialise_padding = True

    def apply(self, func):
        sch, anchor = self.schedule_reduction(func, "group_conv2d_nhwc")
        operands = grouped_operands(sch, anchor) if anchor is not None else None
        if operands is None:
            return None
        data, weight, per_group = operands
        epilogue = epilogue_block(sch, anchor, self.vector.lanes)
        n, y, x, f, ry, rx, rc = sch.get_loops(anchor)
        materialise = self.materialise_padding and extents(sch, [ry, rx]) != [1, 1]
        materialised = inline_inputs(sch, anchor, self.vector.lanes, materialise)
        _, height, width, channels, depth = extents(sch, [n, y, x, f, rc])
        group, f = sch.split(f, [channels // per_group, per_group])
        lane = wants_lane_broadcast(self.vector, depth) and materialised is not False
        (tile_y, tile_x), tile_f = register_tile([height, width], per_group, self.vector, lane_operand=lane)
        (y_outer, x_outer, f_outer), (y_inner, x_inner, f_inner) = split_tiles(sch, [y, x, f], [tile_y, tile_x, tile_f])
        weight_stationary = buffer_size(weight) > buffer_size(data)
        outer = [group, f_outer, n, y_outer, x_outer] if weight_stationary else [n, y_outer, x_outer, group, f_outer]
        tile_nest(sch, anchor, epilogue, outer, [ry, rx, rc, y_inner, x_inner, f_inner], self.vector.lanes)
        if lane:
            rc = lane_broadcast(sch, anchor, rc, self.vector.lanes) or rc
        finish_register_tile(sch, anchor, ry, [y_inner, x_inner], f_inner, self.vector.lanes)
        return sch
