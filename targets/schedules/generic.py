"""The fallback for every kernel the op-family rules do not match: element-wise
and injective kernels (transposes, concat, padding, residual adds, reshapes)
and any other reduction.

After inlining what can be inlined, each remaining block gets its spatial
loops fused; the innermost piece of ``lanes`` (when it divides) is
vectorised and the rest runs in parallel. Reduction blocks get their spatial
loops run in parallel and their reduction loops left serial, so nothing that
LegalizeOps produces is left single-threaded unless it has no spatial loop.
"""

from __future__ import annotations

from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline

from edgec.targets.schedules.common import Rule, iter_kinds, root_blocks, schedule_injective


class Generic(Rule):
    name = "generic"

    def apply(self, func):
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        try_inline(sch, infos)
        scheduled = False
        for block in root_blocks(sch):
            kinds = iter_kinds(sch, block)
            loops = sch.get_loops(block)
            if "O" in kinds or len(loops) != len(kinds) or not loops:
                continue
            if "R" in kinds:
                scheduled |= self._reduction(sch, block, loops, kinds)
            else:
                schedule_injective(sch, block, self.vector.lanes)
                scheduled = True
        return sch if scheduled else None

    def _reduction(self, sch, block, loops, kinds) -> bool:
        spatial = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == "S"]
        reduction = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == "R"]
        if not spatial:
            return False
        sch.reorder(*spatial, *reduction)
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        sch.parallel(fused)
        return True
