"""What every CPU schedule rule shares: the rule interface and the TIR schedule
steps used by several op families. The vector shape a rule tiles for is
``CpuVector`` (targets/vector.py).

A rule is configuration only (``CpuVector``); ``apply(func)`` returns a new
``s_tir.Schedule`` or ``None`` when the kernel is not its kind. Anything a
rule does not match, or fails to schedule, falls through to the next rule
and at the end to ``generic``; a kernel no rule can schedule stays as
LegalizeOps wrote it (correct, slow) and is reported as such.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

from edgec.targets.vector import CpuVector, vectorize_innermost

log = logging.getLogger(__name__)


class Rule:
    """A schedule rule for one op family."""

    name = "rule"

    def __init__(self, vector: CpuVector):
        self.vector = vector

    def apply(self, func) -> Any:  # -> s_tir.Schedule | None
        raise NotImplementedError

    @staticmethod
    def schedule_reduction(func, name_prefix: str = "") -> tuple[Any, Any] | tuple[None, None]:
        """A schedule of ``func`` and its one reduction block, when it has exactly one
        and the block's name starts with ``name_prefix``; else ``(None, None)``."""
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        anchor, _ = single_reduction(sch)
        if anchor is None or not sch.get(anchor).name_hint.startswith(name_prefix):
            return None, None
        return sch, anchor


def is_scheduled(func) -> bool:
    """Whether a PrimFunc carries TVM's ``tirx.is_scheduled`` (a custom op's lowering, a tuning
    database record or a rule scheduled it): the later stages leave it alone."""
    attrs = func.attrs
    return attrs is not None and "tirx.is_scheduled" in attrs and bool(int(attrs["tirx.is_scheduled"]))


def root_blocks(sch) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def iter_kinds(sch, block) -> str:
    """``"SSSSRRR"``: the block's iter vars, S data parallel, R reduction, O other."""
    from tvm import tirx

    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return "".join(kinds.get(int(iv.iter_type), "O") for iv in sch.get(block).iter_vars)


def extents(sch, loops) -> list[int]:
    return [int(sch.get(loop).extent) for loop in loops]


def static_iter_kinds(sch, block) -> str | None:
    """``iter_kinds`` of a block whose iteration extents are all constants, else None
    (the rules schedule static shapes only)."""
    from tvm import tirx

    if not all(isinstance(iv.dom.extent, tirx.IntImm) for iv in sch.get(block).iter_vars):
        return None
    return iter_kinds(sch, block)


def single_reduction(sch) -> tuple[Any | None, list]:
    """(the only reduction block, all blocks) or (None, blocks) when there are 0 or several."""
    blocks = root_blocks(sch)
    reductions = [block for block in blocks if "R" in iter_kinds(sch, block)]
    return (reductions[0] if len(reductions) == 1 else None), blocks


def inline_producers(sch, anchor, keep=()) -> None:
    """Inline every block computed before ``anchor`` (padding, reshapes of parameters)."""
    names = {sch.get(anchor).name_hint}
    for block in root_blocks(sch):
        name = sch.get(block).name_hint
        if name in names:
            break
        if name in keep:
            continue
        sch.compute_inline(block)


def inline_epilogue(sch, anchor, before=None):
    """Inline the element-wise blocks after ``anchor`` (up to ``before``, when given) into one another.

    Returns the one block left after the anchor (the fused epilogue, which
    writes the kernel's output), ``anchor`` itself when there is none, or
    raises ValueError when more than one is left (several outputs).
    """
    blocks = _blocks_between(sch, anchor, before)
    if not blocks:
        return anchor
    for block in blocks[:-1]:
        sch.compute_inline(block)
    tail = _blocks_between(sch, anchor, before)
    if len(tail) != 1:
        raise ValueError(f"{len(tail)} blocks after the anchor: not one fused epilogue")
    return tail[0]


def _blocks_between(sch, anchor, before=None) -> list:
    """The root blocks after ``anchor``, up to (without) ``before`` when it is given."""
    blocks = root_blocks(sch)
    names = [sch.get(block).name_hint for block in blocks]
    end = names.index(sch.get(before).name_hint) if before is not None else len(blocks)
    return blocks[names.index(sch.get(anchor).name_hint) + 1 : end]


def epilogue_block(sch, anchor, lanes: int):
    """The fused epilogue (``inline_epilogue``), or, when the anchor has none, a copy of
    its output made a block of its own (``cache_write``): either way the anchor then
    accumulates in a tile the epilogue block writes out.

    A tail that broadcasts the anchor's result over a bigger output is first split off
    (``broadcast_tail``): the epilogue then ends at the last block of the anchor's shape."""
    tail = broadcast_tail(sch, anchor, lanes)
    epilogue = inline_epilogue(sch, anchor, before=tail)
    return sch.cache_write(anchor, 0, "global") if epilogue is anchor else epilogue


def broadcast_tail(sch, anchor, lanes: int):
    """Split off the blocks after ``anchor`` from the first one whose output is bigger than
    the anchor's: they broadcast its result over a bigger output, as a squeeze-and-excitation
    scale does (``x * sigmoid(fc(s) + b)``, the fc's one pixel over every pixel of ``x``).
    They are inlined into one block computed at root after the anchor's nest, on its own
    (``schedule_injective``: parallel, vectorised), and returned; None when there are none.

    Inlined into the anchor's tile as the rest of the epilogue is, the blocks of the anchor's
    shape before them (bias, sigmoid) would be recomputed for every pixel of the bigger
    output, in the tile's loop, which does not run in parallel when the anchor is small
    (EfficientNet-B0's ``1x1x1x6 -> 1x56x56x144`` scale: a polynomial sigmoid per output
    element, on one thread)."""
    size = buffer_size(sch.get(anchor).writes[0].source)
    after = _blocks_between(sch, anchor)
    grown = [block for block in after if buffer_size(sch.get(block).writes[0].source) > size]
    if not grown:
        return None
    for block in after[after.index(grown[0]) : -1]:
        sch.compute_inline(block)
    tail = _blocks_between(sch, anchor)[-1]
    schedule_injective(sch, tail, lanes)
    return tail


def buffer_size(buffer) -> int:
    """Elements of a buffer of static shape."""
    size = 1
    for dim in buffer.shape:
        size *= int(dim)
    return size


def arithmetic_operations(sch, block) -> int:
    """Arithmetic operations (+ - * /, min, max, calls) of one element of ``block``'s body: how
    heavy an inlined epilogue is (a SiLU with fast_math's sigmoid 73, a ReLU 2)."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    count = [0]

    def note(node):
        count[0] += 1
        return node

    kinds = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.Min, tirx.Max, tvm.ir.Call)
    tvm_ffi.structural_map(sch.get(block).body, (kinds, note), order="post")
    return count[0]


def divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def vector_tile(channels: int, vector: CpuVector, max_vectors: int = 4) -> list[int]:
    """Candidate innermost tiles for a vectorised axis: whole vectors that divide
    ``channels`` (1..max_vectors of them), else the largest power of two below
    one vector that does (24 channels with AVX-512 -> 8)."""
    tiles = [vector.lanes * k for k in range(1, max_vectors + 1) if channels % (vector.lanes * k) == 0]
    if tiles:
        return tiles
    width = vector.lanes // 2
    while width > 1 and channels % width:
        width //= 2
    return [max(1, width)]


# at most this share of padded channels or columns (graph.py step 6, packed_matvec.py)
MAX_PADDING_FRACTION = 1 / 8


def static_shape(ty) -> list[int] | None:
    """The shape of a tensor type when every dimension is a constant, else None."""
    from tvm import tirx

    shape = getattr(ty, "shape", None)
    if shape is None or not all(isinstance(dim, tirx.IntImm) for dim in shape):
        return None
    return [int(dim) for dim in shape]


def padded_channels(channels: int, lanes: int, max_fraction: float = MAX_PADDING_FRACTION) -> int | None:
    """The channel count to pad to (next multiple of ``lanes``), or None when none is needed
    or it would add more than ``max_fraction`` of the work."""
    padded = -(-channels // lanes) * lanes
    if padded == channels or (padded - channels) > channels * max_fraction:
        return None
    return padded


def register_tile(
    rows: list[int], channels: int, vector: CpuVector, max_vectors: int = 4, lane_operand: bool = False,
    max_accumulators: int | None = None, lane_copies: int = 1, ragged: bool = False,
) -> tuple[list[int], int]:
    """Choose the register tile of a channels-last contraction.

    ``rows``: extents of the axes whose points share one weight vector (output
    rows and columns, or matrix rows); each tile factor divides its axis, so no
    tail loops or predicates (but with ``ragged``, below). Returns (row factors, channel tile). The tile
    maximises the FMAs per load, ``p * v / (loads)`` for ``p`` rows and ``v``
    vectors. Per reduction step a tile loads ``v`` weight vectors and ``p``
    broadcast values, or with ``lane_operand`` (``lane_broadcast``: the values
    come a vector of ``lanes`` reduction steps at a time) ``p / lanes`` vectors,
    which then hold ``p`` registers: ``p * v`` accumulators at most
    ``vector.accumulators``, or ``vector.accumulator_budget(p + v)`` with
    ``lane_operand``; and at most ``max_accumulators`` when given.
    ``lane_copies``: how many reduction steps' lane operands are live at once
    (``lane_copies * p`` registers: a loop body LLVM unrolls whose loads it pairs).

    ``ragged``: where the best tile of dividing factors does fewer multiply-adds than loads
    per step (an axis of prime extent: SqueezeNet's 13x13 maps, 13 pixels x 1 vector, 13 / 14),
    the last axis may also take a factor that does not divide it, its score weighed by the
    share of the tiles' points inside the axis (7 of 13: 13 / 14), when that lifts the score
    to one multiply-add per load at least; the caller then runs the last, partial tile apart
    (``tile_nest``'s ``partitioned`` loop).
    """
    best = _best_tile(rows, channels, vector, max_vectors, lane_operand, max_accumulators, lane_copies, False)
    if ragged and best is not None and best[0][0] < 1:
        uneven = _best_tile(rows, channels, vector, max_vectors, lane_operand, max_accumulators, lane_copies, True)
        best = uneven if uneven is not None and uneven[0][0] >= 1 else best
    if best is None:
        return [1] * len(rows), vector_tile(channels, vector, 1)[0]
    return best[1], best[2]


def _best_tile(rows, channels, vector, max_vectors, lane_operand, max_accumulators, lane_copies, ragged):
    """``register_tile``'s search: ((score, accumulators, last factor), factors, channel tile) or None."""
    best = None
    last = rows[-1] if rows else 1
    choices = [divisors(extent) for extent in rows]
    if ragged and rows:
        choices[-1] = list(range(1, last + 1))
    for channel_tile in vector_tile(channels, vector, max_vectors):
        vectors = -(-channel_tile // vector.lanes)
        for factors in itertools.product(*choices):
            points = 1
            for factor in factors:
                points *= factor
            operands = lane_copies * points + vectors
            budget = vector.accumulator_budget(operands) if lane_operand else vector.accumulators
            budget = min(budget, max_accumulators or budget)
            if points * vectors > budget:
                continue
            loads = points / vector.lanes + vectors if lane_operand else points + vectors
            inside = last / (-(-last // factors[-1]) * factors[-1]) if factors else 1.0
            score = (points * vectors / loads * inside, points * vectors, factors[-1] if factors else 0)
            if best is None or score > best[0]:
                best = (score, list(factors), channel_tile)
    return best


def wants_lane_broadcast(vector: CpuVector, depth: int) -> bool:
    """Whether a contraction over ``depth`` should load its broadcast operand a vector
    at a time (``lane_broadcast``): the CPU has a lane multiply-add and whole vectors
    of more than one cover the depth."""
    return vector.lane_fma and depth % vector.lanes == 0 and depth > vector.lanes


def lane_broadcast(sch, anchor, reduction, lanes: int):
    """Load the broadcast operand of the contraction ``anchor`` a vector at a time.

    ``reduction`` is the innermost reduction loop, right outside the register
    tile, and the last index of exactly one of the block's operands (the
    broadcast one: a pixel's channels, a matrix row). The loop is split by
    ``lanes``; at the outer part the operand's tile, ``[tile rows..., lanes]``,
    is copied into a small buffer (one vector load per row; a ``global``-scope
    buffer: TVM puts those on the stack, where LLVM keeps them in registers),
    and the inner part is unrolled, so every multiply-add reads its scalar as a
    lane of those registers (aarch64 ``fmla v.4s, v.4s, v.s[i]``). Returns the
    outer loop, or None (nothing changed) when ``lanes`` does not divide the
    reduction or no single operand ends with it.
    """
    extent = int(sch.get(reduction).extent)
    variable = sch.get(anchor).iter_vars[-1].var
    stmt = sch.get(anchor)
    written = stmt.writes[0].source
    candidates = [
        index for index, region in enumerate(stmt.reads)
        if not region.source.same_as(written) and _last_index_is(region, variable)
    ]  # fmt: skip
    if extent % lanes or extent == lanes or len(candidates) != 1:
        return None
    outer, inner = sch.split(reduction, [None, lanes])
    depth = 1 + [sch.get(loop) for loop in sch.get_loops(anchor)].index(sch.get(outer))
    cached = sch.cache_read(anchor, candidates[0], "global")
    sch.compute_at(cached, outer, preserve_unit_loops=True)
    copy_loops = sch.get_loops(cached)[depth:]
    sch.vectorize(copy_loops[-1])
    for loop in copy_loops[:-1]:
        sch.unroll(loop)
    sch.unroll(inner)
    return outer


def _last_index_is(region, variable) -> bool:
    """Whether the region's last index is the block's iter var ``variable``, or an offset plus
    it (a grouped convolution's ``g * C_g + rc``), with a unit extent."""
    from tvm import tirx

    last = region.region[-1]
    index = last.min.b if isinstance(last.min, tirx.Add) else last.min
    return index.same_as(variable) and int(last.extent) == 1


def schedule_epilogue(sch, epilogue, at_loop, lanes: int) -> None:
    """Compute ``epilogue`` inside ``at_loop``, right after the tile it reads: vectorise the
    channel axis, unroll the rest."""
    sch.reverse_compute_at(epilogue, at_loop, preserve_unit_loops=True)
    vectorize_innermost(sch, sch.get_loops(epilogue)[-1], lanes)


# parallel chunks smaller than this many elements cost more in thread wake-ups than they save
MIN_PARALLEL_ELEMENTS = 4096
MIN_PARALLEL_ROWS = 16  # fewer rows (outer iterations) than this: a row's vectors are shared out too
MIN_VECTOR_LANES = 4  # the narrowest vector schedule_injective splits an innermost axis into


def schedule_injective(sch, block, lanes: int) -> None:
    """One spatial block on its own: loops fused, ``lanes`` at a time vectorised
    (when they divide), the rest in parallel when it is big enough.

    An innermost axis shorter than a vector whose extent does not divide ``lanes``
    (an RGB image's 3 channels, NHWC) is unrolled instead, the axis before it left a
    loop: a vector of the flattened loop would straddle pixels with a different
    ``% 3`` per lane, which LLVM scalarises with a division per element (ResNet-18's
    padded stem input and NCHW -> NHWC transpose on cortex-a53); the two loops carry
    ``pragma_loop_partition_hint``, so a zero-padded copy's interior pixels go without the
    border test (the copy of a 224x224x3 stem input alone ran 913k instructions on cortex-a53;
    with int32 indices, ``narrow_indices``, ShuffleNetV2's stem kernel with its copy 4.13M ->
    3.29M; a transpose has no test, nothing to split). An innermost axis at least a
    vector long that is a whole number of vectors (of ``lanes``, or of a half or quarter of it)
    is split on its own, so that each vector lies inside it."""
    loops = sch.get_loops(block)
    sizes = extents(sch, loops)
    total = 1
    for extent in sizes:
        total *= extent
    if len(loops) > 2 and sizes[-1] < lanes and lanes % sizes[-1]:
        outer = sch.fuse(*loops[:-2])
        sch.unroll(loops[-1])
        sch.annotate(outer, "pragma_loop_partition_hint", 1)
        sch.annotate(loops[-2], "pragma_loop_partition_hint", 1)
        if total >= MIN_PARALLEL_ELEMENTS:
            sch.parallel(outer)
        return
    width = lanes  # AVX-512's 24 channels: 8 lanes (a ymm vector), not a flattened loop
    while width > MIN_VECTOR_LANES and sizes[-1] % width:
        width //= 2
    if len(loops) > 1 and sizes[-1] >= lanes and sizes[-1] % width == 0:
        # vectors within the innermost axis, a loop of its own: a vector's index is affine in
        # it (an NHWC slice or concat of channels loads whole vectors, with no ``// C`` per vector)
        chunks, inner = sch.split(loops[-1], [None, width])
        sch.vectorize(inner)
        rows = total // sizes[-1]
        outer = sch.fuse(*loops[:-1], *([chunks] if rows < MIN_PARALLEL_ROWS else []))
        if total >= MIN_PARALLEL_ELEMENTS:
            sch.parallel(outer)
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if total % lanes == 0 and total >= lanes:
        outer, inner = sch.split(fused, [None, lanes])
        sch.vectorize(inner)
    else:
        outer = fused
    if total >= MIN_PARALLEL_ELEMENTS:
        sch.parallel(outer)


# kernels with fewer multiply-adds than this stay on one thread: waking the pool costs more
MIN_PARALLEL_WORK = 1 << 17


def block_work(sch, block) -> int:
    """The product of a block's iteration extents: multiply-adds for a contraction."""
    work = 1
    for iv in sch.get(block).iter_vars:
        work *= int(iv.dom.extent)
    return work


def parallel_outer(sch, loops, work: int | None = None) -> Any:
    """Fuse ``loops`` into one and run it on TVM's thread pool, unless ``work`` is too
    small to pay for the threads' wake-up (``MIN_PARALLEL_WORK``)."""
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if work is None or work >= MIN_PARALLEL_WORK:
        sch.parallel(fused)
    return fused


def split_tiles(sch, loops, tiles) -> tuple[list, list]:
    """Split each loop by its tile size: ``(outer loops, inner loops)``."""
    pairs = [sch.split(loop, [None, tile]) for loop, tile in zip(loops, tiles, strict=True)]
    return [outer for outer, _ in pairs], [inner for _, inner in pairs]


def tile_nest(sch, anchor, epilogue, outer, inner, lanes: int, partitioned=None) -> Any:
    """Order the anchor's loops ``outer`` then ``inner``, run the fused outer loops in
    parallel (``parallel_outer``) and compute the epilogue inside them; returns the fused loop.

    ``partitioned``: the outer loop of a tile that does not divide its axis (``register_tile``'s
    ``ragged``), placed between ``outer`` and ``inner``, serial and carrying
    ``pragma_loop_partition_hint``, which lets TVM's LoopPartition split off its last iteration,
    the only one whose points test the axis' end. In the LLVM IR of a 13-wide map (7 + 6) each
    tile's reduction step has no test left (tests/targets/test_ragged_tile.py; that two-tile loop
    comes out the same without the hint, TVM unrolls it). The epilogue is then computed inside
    it, one tile at a time."""
    sch.reorder(*outer, *([partitioned] if partitioned is not None else []), *inner)
    fused = parallel_outer(sch, outer, block_work(sch, anchor))
    if partitioned is not None:
        sch.annotate(partitioned, "pragma_loop_partition_hint", 1)
    schedule_epilogue(sch, epilogue, partitioned if partitioned is not None else fused, lanes)
    return fused


def border_partitioned_nest(sch, anchor, epilogue, outer, taps, inner, lanes: int) -> None:
    """Order a window kernel's loops (depthwise convolution, pooling): ``outer`` = (batch,
    rows, column tiles, channel tiles), then the window's ``taps`` (unrolled), then the tile's
    ``inner`` loops. The batch and rows run fused in parallel (``parallel_outer``); the rows and
    the column tiles carry ``pragma_loop_partition_hint``, so TVM's LoopPartition splits off
    the tiles that touch the border (their loads keep the padding test) from the interior
    ones; the epilogue is computed per channel tile."""
    batch, rows, columns, channels = outer
    sch.reorder(*outer, *taps, *inner)
    fused = parallel_outer(sch, [batch, rows], block_work(sch, anchor))
    sch.annotate(fused, "pragma_loop_partition_hint", 1)
    sch.annotate(columns, "pragma_loop_partition_hint", 1)
    schedule_epilogue(sch, epilogue, channels, lanes)
    for tap in taps:
        sch.unroll(tap)


def split_init(sch, anchor, first_reduction, unrolled: int, vectorise: bool = True) -> None:
    """The accumulators' initialisation split out of ``anchor`` in front of ``first_reduction``:
    its innermost loop vectorised (``vectorise``), the ``unrolled`` loops around it unrolled, as
    the tile's own loops are."""
    init = sch.decompose_reduction(anchor, first_reduction)
    loops = sch.get_loops(init)[-(unrolled + 1) :]
    if vectorise:
        sch.vectorize(loops[-1])
    for loop in loops[:-1]:
        sch.unroll(loop)
