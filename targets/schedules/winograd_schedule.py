"""Schedules of the Winograd transform kernels (winograd_kernels.py); the GEMM between
them is a batched matrix product and ``dense.py`` schedules it.

    winograd_input   parallel (tiles p)
                       for c / lanes:
                         for eps, j: (unrolled)  for lanes: (vectorised)
                           R[eps, j, c] = (B^T d)[eps, j]      (alpha^2 vectors on the stack: registers)
                         for t: (unrolled)  for lanes: (vectorised)
                           V[t, p, c] = (R B)[t]
    winograd_output  (fused with the epilogue, one block after the row pass)
                     parallel (n, y / m, x / m)
                       for f / lanes:
                         for a, col: (unrolled)  for lanes: (vectorised)
                           S[a, col, f] = (M A)[a, col]        (on the stack: registers)
                         for y % m, x % m: (unrolled)  for lanes: (vectorised)
                           out[n, y, x, f] = g((A^T S)[y % m, x % m])

Unrolling the tile-element loops turns each element's ``if_then_else``
choice into one expression and lets LLVM load each input of the tile once
for all elements of the tile (alpha^2 loads instead of alpha^2 times the
nonzero terms). An output whose size is not a multiple of ``m`` keeps a
predicated last tile. Blocks fused after the epilogue that change the shape (a
concatenation, a layout transpose before an NCHW output) read its result as
injective blocks of their own.
"""

from __future__ import annotations

import math

from edgec.targets.schedules.common import (
    MIN_PARALLEL_ELEMENTS,
    Rule,
    extents,
    root_blocks,
    schedule_injective,
    vector_tile,
)
from edgec.targets.schedules.winograd_kernels import INPUT_COLUMNS, INPUT_KERNEL, OUTPUT_KERNEL, OUTPUT_ROWS


def _alpha(buffer) -> int:
    """alpha of a ``[alpha*alpha, tiles, channels]`` transformed buffer."""
    elements = int(buffer.shape[0])
    alpha = math.isqrt(elements)
    if alpha * alpha != elements:
        raise ValueError(f"{elements} tile elements: not a square")
    return alpha


class WinogradTransforms(Rule):
    name = "winograd-transform"

    def apply(self, func):
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        names = [sch.get(block).name_hint for block in blocks]
        if names == [INPUT_COLUMNS, INPUT_KERNEL]:
            self._input(sch, blocks[0], blocks[1])
            return sch
        if names[:2] == [OUTPUT_ROWS, OUTPUT_KERNEL]:
            return sch if self._output(sch, blocks[0], blocks[1]) else None
        return None

    def _channel_split(self, sch, loop):
        extent = int(sch.get(loop).extent)
        lanes = vector_tile(extent, self.vector, 1)[0]
        return sch.split(loop, [None, lanes])

    def _input(self, sch, columns, block):
        t, p, c = sch.get_loops(block)
        c_outer, c_inner = self._channel_split(sch, c)
        sch.reorder(p, c_outer, t, c_inner)
        _finish(sch, block, p, [t], c_inner)
        _first_pass_at(sch, columns, c_outer)

    def _output(self, sch, rows, anchor) -> bool:
        """Schedule the output transform and its element-wise epilogue; what follows that changes
        the shape (a concatenation, SqueezeNet's Fire modules; a layout transpose at the graph's
        end) reads the result as a block of its own, an injective copy, rather than being
        inlined: inlined, it recomputed the whole tile's transform for every element it writes."""
        alpha = _alpha(sch.get(rows).reads[0].source)
        m = alpha - 2
        epilogue = _same_shape_epilogue(sch, anchor)
        if epilogue is not anchor:
            sch.compute_inline(anchor)
        tail = _after(sch, epilogue)
        n, y, x, f = sch.get_loops(epilogue)
        y_outer, y_inner = sch.split(y, [None, m])
        x_outer, x_inner = sch.split(x, [None, m])
        f_outer, f_inner = self._channel_split(sch, f)
        sch.reorder(n, y_outer, x_outer, f_outer, y_inner, x_inner, f_inner)
        # every tile a parallel iteration: tile rows alone are 7 for a 27x27 output, which two
        # threads split 4 / 3 and four 2 / 2 / 2 / 1
        _finish(sch, epilogue, sch.fuse(n, y_outer, x_outer), [y_inner, x_inner], f_inner)
        _first_pass_at(sch, rows, f_outer)
        if tail:
            for block in tail[:-1]:
                sch.compute_inline(block)
            schedule_injective(sch, _after(sch, epilogue)[-1], self.vector.lanes)
        return True


def _after(sch, block) -> list:
    blocks = root_blocks(sch)
    names = [sch.get(each).name_hint for each in blocks]
    return blocks[names.index(sch.get(block).name_hint) + 1 :]


def _same_shape_epilogue(sch, anchor):
    """The element-wise blocks right after ``anchor`` that write its output's shape, inlined into the
    last of them, which is returned (``anchor`` when there is none)."""
    shape = _shape(sch, anchor)
    same = []
    for block in _after(sch, anchor):
        if _shape(sch, block) != shape:
            break
        same.append(block)
    for block in same[:-1]:
        sch.compute_inline(block)
    return _after(sch, anchor)[0] if same else anchor


def _shape(sch, block) -> list[int]:
    return [int(dim) for dim in sch.get(block).writes[0].source.shape]


def _finish(sch, block, outer, unrolled, vectorised) -> None:
    """The outer loop in parallel when the block is big enough, the tile's loops
    unrolled, the channel vector vectorised."""
    if _elements(sch, block) >= MIN_PARALLEL_ELEMENTS:
        sch.parallel(outer)
    for loop in unrolled:
        sch.unroll(loop)
    sch.vectorize(vectorised)


def _first_pass_at(sch, block, loop) -> None:
    """A separable transform's first pass computed per tile and channel vector at ``loop``,
    into a small global-scope buffer: TVM allocates it on the stack, and LLVM keeps it in
    registers. Its three tile loops unrolled, its channel vector vectorised."""
    sch.compute_at(block, loop, preserve_unit_loops=True)
    *unrolled, lanes = sch.get_loops(block)[-4:]
    for tile_loop in unrolled:
        sch.unroll(tile_loop)
    sch.vectorize(lanes)


def _elements(sch, block) -> int:
    total = 1
    for extent in extents(sch, sch.get_loops(block)):
        total *= extent
    return total
