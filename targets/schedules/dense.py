"""Dense layers and matrix products: ``out[..., m, n] += a[..., m, k] * b[..., k, n]``
with the fused epilogue (bias, activation). The ONNX importer stores a
Linear/Gemm weight already transposed to ``[k, n]``, so ``n`` is contiguous
in the weight and the output:

    parallel  (batch..., m/M, n/N)
      init      acc[M, N] = 0
      for k:  for M: (unrolled)  for N: (vectorised)
                acc[m, n] += a[m, k] (broadcast) * b[k, n]
      epilogue  out[M, N] = g(acc)

At batch 1 (``m == 1``) this is a matrix-vector product bound by reading the
weights once, split over the threads by output columns.
"""

from __future__ import annotations

from edgec.targets.schedules.common import (
    Rule,
    block_work,
    extents,
    has_constant_extents,
    inline_epilogue,
    inline_producers,
    iter_kinds,
    parallel_outer,
    register_tile,
    schedule_epilogue,
    single_reduction,
)
from edgec.targets.schedules.conv2d import finish_register_tile


def matmul_operands(sch, block):
    """(a, b) regions when ``block`` is ``out[..., m, n] += a[..., m, k] * b[..., k, n]``."""
    stmt = sch.get(block)
    kinds = iter_kinds(sch, block)
    if not kinds.endswith("SSR") or set(kinds[:-3]) - {"S"} or not has_constant_extents(sch, block):
        return None
    variables = [iv.var for iv in stmt.iter_vars]
    *batch, m, n, k = variables
    if len(stmt.writes) != 1 or not _ends_with(stmt.writes[0], [m, n]):
        return None
    reads = [region for region in stmt.reads if not region.source.same_as(stmt.writes[0].source)]
    if len(reads) != 2:
        return None
    a, b = reads
    if not (_ends_with(a, [m, k]) and _ends_with(b, [k, n])):
        return None
    return a, b


def _ends_with(region, variables) -> bool:
    tail = region.region[-len(variables) :]
    return len(region.region) >= len(variables) and all(
        r.min.same_as(v) and int(r.extent) == 1 for r, v in zip(tail, variables, strict=True)
    )


class Dense(Rule):
    name = "dense"

    def apply(self, func):
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        anchor, _ = single_reduction(sch)
        if anchor is None or matmul_operands(sch, anchor) is None:
            return None
        epilogue = inline_epilogue(sch, anchor)
        if epilogue is anchor:
            epilogue = sch.cache_write(anchor, 0, "global")
        inline_producers(sch, anchor)
        *batch, m, n, k = sch.get_loops(anchor)
        rows, columns = extents(sch, [m, n])
        (tile_m,), tile_n = register_tile([rows], columns, self.vector)
        m_outer, m_inner = sch.split(m, [None, tile_m])
        n_outer, n_inner = sch.split(n, [None, tile_n])
        outer = [*batch, m_outer, n_outer]
        sch.reorder(*outer, k, m_inner, n_inner)
        fused = parallel_outer(sch, outer, block_work(sch, anchor))
        schedule_epilogue(sch, epilogue, fused, self.vector.lanes)
        finish_register_tile(sch, anchor, k, [m_inner], n_inner, self.vector.lanes)
        return sch
