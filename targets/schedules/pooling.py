"""Pooling and other reductions whose output keeps a contiguous innermost axis:
max/avg pooling in NHWC (``out[n, y, x, c] = max over ry, rx``), global
average pooling (``mean`` over H and W), channel-last reductions.

The innermost output axis is not reduced, so the reduction loops move outside
it and it is vectorised; the outer output axes run in parallel:

    parallel  (n, y, x, c/C)
      init      acc[C] = 0 / -inf
      for ry, rx:  for C: (vectorised)  acc[c] = max(acc[c], in[..., c])
      epilogue  out[C] = g(acc)          (avg: divide; plus fused element-wise ops)

Padding (max pool's -inf border) is inlined into the loads.

A window pool (NHWC, ``out[n, y, x, c] = max over ry, rx of in[n, y*s + ry, x*s + rx, c]``)
is tiled like a depthwise convolution (depthwise.py): ``X`` output columns by a
vector tile of channels per step, the window's taps unrolled (neighbouring
windows share input columns: with stride 2 a 3-wide window of 4 columns loads
9 columns, not 12), and the row and column loops carry
``pragma_loop_partition_hint``, so TVM's LoopPartition splits off the tiles that
touch the border and the interior loads go without the padding test; on aarch64
the maximum is ``fmaxnm`` (``max_as_maxnum``):

    parallel  (n, y)                                   (partitioned)
      for x/X:                                         (partitioned)
        for c/C:
          init      acc[X, C] = -inf
          for ry, rx:  (unrolled)  for X: (unrolled)  for C: (vectorised)
            acc[x, c] = max(acc[x, c], in[n, y*s + ry, x*s + rx, c])
          epilogue  out[X, C] = g(acc)

ShuffleNetV2's 3x3/2 max pool (112x112x24) on cortex-a53: 2,011,079
instructions before (a border test in every load, the taps a loop), 354,146
after (README "Max pool and few-channel stems").
"""

from __future__ import annotations

from edgec.targets.schedules.common import (
    Rule,
    border_partitioned_nest,
    divisors,
    epilogue_block,
    extents,
    inline_producers,
    iter_kinds,
    split_tiles,
    static_iter_kinds,
    tile_nest,
    vector_tile,
)
from edgec.targets.schedules.conv2d import finish_register_tile

# a window tile's accumulators: half the register file, the other half for the loaded columns
WINDOW_ACCUMULATORS = 16


def _innermost_spatial_is_contiguous(sch, block) -> bool:
    """The last spatial iter indexes the last axis of the output and of every input read."""
    stmt = sch.get(block)
    kinds = iter_kinds(sch, block)
    spatial = [iv.var for iv, kind in zip(stmt.iter_vars, kinds, strict=True) if kind == "S"]
    if not spatial:
        return False
    last = spatial[-1]
    regions = list(stmt.writes) + [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
    return all(len(r.region) > 0 and r.region[-1].min.same_as(last) for r in regions)


def max_as_maxnum(func):
    """``func`` with its float32 ``max`` as LLVM's ``maxnum`` (IEEE maxNum: the number when one side
    is NaN), which aarch64 runs as one ``fmaxnm``; TVM's ``max`` is ``a > b ? a : b``, there two
    instructions and a copy (``fcmgt``, ``bsl``, ``mov``). For CPUs with ``CpuVector.max_number``."""
    import tvm_ffi
    from tvm import tirx

    def rewrite(node):
        if str(node.ty) != "float32":
            return node
        return tirx.call_llvm_pure_intrin("float32", "llvm.maxnum", node.a, node.b)

    return func.with_body(tvm_ffi.structural_map(func.body, (tirx.Max, rewrite), order="post"))


class Pooling(Rule):
    name = "pool-reduce"

    def apply(self, func):
        sch, anchor = self.schedule_reduction(func)
        kinds = static_iter_kinds(sch, anchor) if anchor is not None else None
        if kinds is None or "O" in kinds or kinds.rstrip("R").count("R") or not kinds.startswith("S"):
            return None  # spatial iters first, then reductions
        if len(sch.get(anchor).writes) != 1 or not _innermost_spatial_is_contiguous(sch, anchor):
            return None
        epilogue = epilogue_block(sch, anchor, self.vector.lanes)
        inline_producers(sch, anchor)
        loops = sch.get_loops(anchor)
        if kinds == "SSSSRR" and min(extents(sch, loops[1:3])) > 1:
            if self.vector.max_number:
                sch, anchor = self.schedule_reduction(max_as_maxnum(func))
                epilogue = epilogue_block(sch, anchor, self.vector.lanes)
                inline_producers(sch, anchor)
            return self.window(sch, anchor, epilogue, sch.get_loops(anchor))
        spatial_count = kinds.count("S")
        spatial, reduction = loops[:spatial_count], loops[spatial_count:]
        (channels,) = extents(sch, [spatial[-1]])
        tile = vector_tile(channels, self.vector, max_vectors=4)[-1]
        c_outer, c_inner = sch.split(spatial[-1], [None, tile])
        outer = [*spatial[:-1], c_outer]
        tile_nest(sch, anchor, epilogue, outer, [*reduction, c_inner], self.vector.lanes)
        if tile > 1:
            sch.vectorize(c_inner)
        init = sch.decompose_reduction(anchor, reduction[0])
        if tile > 1:
            sch.vectorize(sch.get_loops(init)[-1])
        return sch

    def window(self, sch, anchor, epilogue, loops):
        """A window pool over the rows and columns of an NHWC tensor (module docstring)."""
        n, y, x, c, ry, rx = loops
        _, width, channels = extents(sch, [n, x, c])
        tile = vector_tile(channels, self.vector, max_vectors=4)[-1]
        vectors = -(-tile // self.vector.lanes)
        budget = max(1, min(self.vector.accumulators, WINDOW_ACCUMULATORS) // vectors)
        tile_x = max(d for d in divisors(width) if d <= budget)
        (x_outer, c_outer), (x_inner, c_inner) = split_tiles(sch, [x, c], [tile_x, tile])
        border_partitioned_nest(sch, anchor, epilogue, [n, y, x_outer, c_outer], [ry, rx], [x_inner, c_inner], self.vector.lanes)
        finish_register_tile(sch, anchor, ry, [x_inner], c_inner, self.vector.lanes)
        return sch
