"""Dense layers and matrix products: ``out[..., m, n] += a[..., m, k] * b[..., k, n]``
with the fused epilogue (bias, activation). The ONNX importer stores a
Linear/Gemm weight already transposed to ``[k, n]``, so ``n`` is contiguous
in the weight and the output:

    parallel  (batch..., m/M, n/N), or (batch..., n/N, m/M) when ``b`` is the bigger operand and
              one matrix of it is over WEIGHT_STATIONARY_BYTES (``streams_weights``;
              weights-stationary: a column panel of ``b`` stays in cache across the row tiles;
              row tiles outside read all of ``b`` once per tile: 40 times for a ViT's 200 x 768
              x 3072 product, from L3 or DRAM in a whole inference)
      init      acc[M, N] = 0
      for k:  for M: (unrolled)  for N: (vectorised)
                acc[m, n] += a[m, k] (broadcast) * b[k, n]
      epilogue  out[M, N] = g(acc)

On CPUs with a lane multiply-add (aarch64) ``a`` is read a vector of ``lanes``
k at a time (``common.lane_broadcast``): ``for k / lanes: a_tile[M, lanes] =
a[m, k...]; for lanes, M, N: acc += a_tile[m, l] (a lane) * b[k, n]``.
``b`` may come packed by the tile's columns, ``b[..., n // N, k, n % N]`` (the Winograd
GEMM's weights on aarch64, packed_weights.py), read through an inlined view.

At batch 1 (``m == 1``) this is a matrix-vector product bound by reading the
weights once, split over the threads by output columns.
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
    split_tiles,
    static_iter_kinds,
    tile_nest,
    wants_lane_broadcast,
)
from edgec.targets.schedules.conv2d import finish_register_tile


def matmul_operands(sch, block):
    """(a, b) regions when ``block`` is ``out[..., m, n] += a[..., m, k] * b[..., k, n]``."""
    stmt = sch.get(block)
    kinds = static_iter_kinds(sch, block)
    if kinds is None or not kinds.endswith("SSR") or set(kinds[:-3]) - {"S"}:
        return None
    variables = [iv.var for iv in stmt.iter_vars]
    *batch, m, n, k = variables
    if len(stmt.writes) != 1 or not _ends_with(stmt.writes[0], [m, n]):
        return None
    reads = [region for region in stmt.reads if not region.source.same_as(stmt.writes[0].source)]
    if len(reads) != 2:
        return None
    a, b = reads
    if not (_ends_with(a, [m, k]) and (_ends_with(b, [k, n]) or packed_columns(b, k, n))):
        return None
    return a, b


def packed_columns(region, k, n) -> int | None:
    """The column tile ``T`` when ``region`` reads ``b`` packed by it, ``b[..., n // T, k, n % T]``
    (packed_weights.py), else None."""
    from tvm import tirx

    if len(region.region) < 3 or any(int(r.extent) != 1 for r in region.region[-3:]):
        return None
    block, depth, lane = (r.min for r in region.region[-3:])
    if not (depth.same_as(k) and isinstance(block, tirx.FloorDiv) and isinstance(lane, tirx.FloorMod)):
        return None
    if not (block.a.same_as(n) and lane.a.same_as(n) and isinstance(block.b, tirx.IntImm)):
        return None
    return int(block.b) if isinstance(lane.b, tirx.IntImm) and int(lane.b) == int(block.b) else None


def _ends_with(region, variables) -> bool:
    tail = region.region[-len(variables) :]
    return len(region.region) >= len(variables) and all(
        r.min.same_as(v) and int(r.extent) == 1 for r, v in zip(tail, variables, strict=True)
    )


# bytes of one matrix of ``b`` over which the row tiles go inside the column tiles (L2 size on the
# x86 cores here; a ViT-B's 768 x 768 and 768 x 3072 weights: 2.4 and 9.4 MB). Below it the order
# stays rows outside: Winograd GEMMs' 64-1024 KB matrices measured no better flipped
# (ResNet-18, x86, one thread, alternated on a loaded machine: 12 % slower or the same).
WEIGHT_STATIONARY_BYTES = 1 << 20


def streams_weights(a, b) -> bool:
    """Whether the product with operand regions ``a``, ``b`` keeps ``b``'s column panels in cache
    across the row tiles (weights-stationary): ``b`` the bigger operand, one matrix of it
    (its last two axes, three when packed) over WEIGHT_STATIONARY_BYTES."""
    from tvm import tirx

    packed = isinstance(b.region[-1].min, tirx.FloorMod)  # b[..., n // T, k, n % T]
    matrix = 1
    for dim in b.source.shape[-3 if packed else -2 :]:
        matrix *= int(dim)
    itemsize = b.source.dtype.bits // 8
    return matrix * itemsize > WEIGHT_STATIONARY_BYTES and buffer_size(b.source) > buffer_size(a.source)


# column vectors of a matrix-vector product's tile (one row, ``a`` read by lane: aarch64). Every
# weight vector feeds one multiply-add there, so a wider tile only spreads the loop's own
# instructions and the row's lane load over more of them: MobileNetV2's 1280 -> 1000 classifier on
# cortex-a53, 2 vectors (8 columns) 679,923 instructions, 10 vectors (40 columns) 641,905.
MATVEC_MAX_VECTORS = 16


class Dense(Rule):
    name = "dense"

    def apply(self, func):
        sch, anchor = self.schedule_reduction(func)
        if anchor is None or matmul_operands(sch, anchor) is None:
            return None
        epilogue = epilogue_block(sch, anchor, self.vector.lanes)
        inline_producers(sch, anchor)
        *batch, m, n, k = sch.get_loops(anchor)
        rows, columns, depth = extents(sch, [m, n, k])
        lane = wants_lane_broadcast(self.vector, depth)
        widest = MATVEC_MAX_VECTORS if lane and rows == 1 else 4
        (tile_m,), tile_n = register_tile([rows], columns, self.vector, max_vectors=widest, lane_operand=lane)
        (m_outer, n_outer), (m_inner, n_inner) = split_tiles(sch, [m, n], [tile_m, tile_n])
        weight_stationary = streams_weights(*matmul_operands(sch, anchor))
        outer = [*batch, *((n_outer, m_outer) if weight_stationary else (m_outer, n_outer))]
        tile_nest(sch, anchor, epilogue, outer, [k, m_inner, n_inner], self.vector.lanes)
        if lane:
            k = lane_broadcast(sch, anchor, k, self.vector.lanes) or k
        finish_register_tile(sch, anchor, k, [m_inner], n_inner, self.vector.lanes)
        return sch
