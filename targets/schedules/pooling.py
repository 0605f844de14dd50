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
"""

from __future__ import annotations

from edgec.targets.schedules.common import (
    Rule,
    epilogue_block,
    extents,
    inline_producers,
    iter_kinds,
    static_iter_kinds,
    tile_nest,
    vector_tile,
)


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


class Pooling(Rule):
    name = "pool-reduce"

    def apply(self, func):
        sch, anchor = self.schedule_reduction(func)
        kinds = static_iter_kinds(sch, anchor) if anchor is not None else None
        if kinds is None or "O" in kinds or kinds.rstrip("R").count("R") or not kinds.startswith("S"):
            return None  # spatial iters first, then reductions
        if len(sch.get(anchor).writes) != 1 or not _innermost_spatial_is_contiguous(sch, anchor):
            return None
        epilogue = epilogue_block(sch, anchor)
        inline_producers(sch, anchor)
        loops = sch.get_loops(anchor)
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
