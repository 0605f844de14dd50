"""Fold the additions right after a contraction into its accumulators' initial value.

A fused convolution kernel ends ``out = g(acc + b[f] + r[n, y, x, f])``: a per-channel
bias (BN's shift, a conv bias) and, in a residual block, the shortcut. Each addition
costs one vector instruction per output vector in the epilogue, on top of the zeroing
of the accumulators. Folded, the accumulators start at what is added:

    init  acc[n, y, x, f] = b[f] + r[n, y, x, f]         (was 0)
          acc[n, y, x, f] += data[...] * w[...]          (unchanged)
    out   = g(acc)                                       (the additions become copies)

so a bias costs a copy instead of a zeroing and an add: one instruction less per
output vector (aarch64: ``mov`` for ``movi``; the epilogue's ``fadd`` gone). Only
the float sum's order changes (the bias first, not last).

Folded: a chain of blocks, starting with the one after the contraction, each
``C2[v] = C[v] + L`` (or ``L + C[v]``) with ``v`` its iter vars, ``C`` the buffer the
previous block writes, read by no other block, and ``L`` a load of a buffer no block
writes (a parameter) indexed by those iter vars or constants. The rewrite is done on
the schedule's state (``ScheduleState.replace``), before any loop is transformed.
"""

from __future__ import annotations

import logging

from edgec.targets.schedules.common import root_blocks

log = logging.getLogger(__name__)


def folds_adds(vector) -> bool:
    """Whether the rules fold for ``vector``'s CPU: measured on aarch64 only (CPUs with the lane
    multiply-add), where it is on."""
    return vector.lane_fma


def fold_epilogue_adds(sch, anchor) -> int:
    """Fold the additions after the contraction ``anchor`` into its init (module
    docstring); returns how many were folded (0: nothing changed)."""
    blocks = root_blocks(sch)
    names = [sch.get(block).name_hint for block in blocks]
    position = names.index(sch.get(anchor).name_hint)
    stmt = sch.get(anchor)
    if stmt.init is None or len(stmt.writes) != 1 or not _is_store_to(stmt.init, stmt.writes[0]):
        return 0
    written = [region.source for block in blocks for region in sch.get(block).writes]
    anchor_indices = list(stmt.init.indices)
    added = []  # the loads folded, indexed in the anchor's iter vars
    copies = []  # (block rv, new block) of the additions turned into copies
    current = stmt.writes[0].source
    for block in blocks[position + 1 :]:
        if _readers(sch, blocks, current) != 1:
            break
        folded = _folded_operand(sch.get(block), current, anchor_indices, written)
        if folded is None:
            break
        load, copy = folded
        added.append(load)
        copies.append((block, copy))
        current = sch.get(block).writes[0].source
    if not added:
        return 0
    _replace(sch, anchor, _with_init(stmt, added))
    for block, copy in copies:
        _replace(sch, block, copy)
    log.debug("%s: %d addition(s) folded into the init", stmt.name_hint, len(added))
    return len(added)


def _is_store_to(init, region) -> bool:
    from tvm import tirx

    return (
        isinstance(init, tirx.BufferStore) and init.buffer.same_as(region.source)
        and isinstance(init.value, tirx.FloatImm) and float(init.value.value) == 0.0
        and all(isinstance(index, tirx.Var) for index in init.indices)
    )  # fmt: skip


def _readers(sch, blocks, buffer) -> int:
    return sum(any(region.source.same_as(buffer) for region in sch.get(block).reads) for block in blocks)


def _folded_operand(block, source, anchor_indices, written):
    """(the load ``L`` in the anchor's indices, the block made a copy of ``source``) when
    ``block`` is ``out[v] = source[v] + L`` as the module docstring says, else None."""
    from tvm import ir, tirx

    body = block.body
    variables = [iv.var for iv in block.iter_vars]
    if block.init is not None or not isinstance(body, tirx.BufferStore) or not isinstance(body.value, tirx.Add):
        return None
    if len(variables) != len(anchor_indices) or not _indexed_by(body.indices, variables):
        return None
    if any(int(iv.iter_type) != tirx.IterVar.DataPar for iv in block.iter_vars):
        return None
    operands = [body.value.a, body.value.b]
    kept = [op for op in operands if isinstance(op, ir.TensorLoad) and op.source.same_as(source) and _indexed_by(op.indices, variables)]
    if len(kept) != 1:
        return None
    other = operands[1] if kept[0].same_as(operands[0]) else operands[0]
    if not isinstance(other, ir.TensorLoad) or any(other.source.same_as(buffer) for buffer in written):
        return None
    mapping = {var: index for var, index in zip(variables, anchor_indices, strict=True)}
    indices = []
    for index in other.indices:
        if isinstance(index, tirx.IntImm):
            indices.append(index)
        elif isinstance(index, tirx.Var) and index in mapping:
            indices.append(mapping[index])
        else:
            return None
    load = tirx.BufferLoad(other.source, indices)
    typed = next(region for region in block.reads if region.source.same_as(other.source))
    region = ir.TensorRegion(other.source, [ir.Range.from_min_extent(i, 1) for i in indices], typed.ty)
    reads = [region for region in block.reads if region.source.same_as(source)]
    copy = _block(block, body=tirx.BufferStore(body.buffer, kept[0], body.indices), reads=reads)
    return (load, region), copy


def _indexed_by(indices, variables) -> bool:
    return len(indices) == len(variables) and all(i.same_as(v) for i, v in zip(indices, variables, strict=True))


def _with_init(stmt, added):
    """The contraction ``stmt`` with its init storing the sum of the loads ``added``
    ((load, its region) pairs), which it then also reads."""
    from tvm import tirx

    value = added[0][0]
    for load, _ in added[1:]:
        value = value + load
    init = tirx.BufferStore(stmt.init.buffer, value, stmt.init.indices)
    return _block(stmt, init=init, reads=[*stmt.reads, *(region for _, region in added)])


def _block(stmt, **changes):
    from tvm import s_tir

    fields = dict(
        iter_vars=stmt.iter_vars, reads=stmt.reads, writes=stmt.writes, name_hint=stmt.name_hint, body=stmt.body,
        init=stmt.init, alloc_buffers=stmt.alloc_buffers, match_buffers=stmt.match_buffers, annotations=stmt.annotations,
    )  # fmt: skip
    fields.update(changes)
    return s_tir.SBlock(**fields)


def _replace(sch, block, new) -> None:
    old = sch.get(block)
    sch.state.replace(sch.get_sref(block), new, {old: new})
