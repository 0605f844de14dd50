"""The dot-product convolution (dot_kernels.py, aarch64 ``sdot``): 16 int8 multiply-adds per
instruction, with its fused element-wise epilogue (the requantization).

    parallel  (n, y/Y, x/X, f/F)  or (f/F, n, y/Y, x/X) when the weights are the bigger operand
      init      acc[Y, X, F] = 0                                   (int32 x 4 vectors)
      for ry, rx, g/4:                                             (reduction, g: groups of 4 channels)
        signed[Y, X, 16] = x[..., 16 channels] ^ 0x80               (one 16-byte load + eor per pixel)
        for g%4, Y, X, F/4: (unrolled)
          acc[y, x, 4f:4f+4] = sdot(acc, signed[y, x, 4g:4g+4] (a lane), P[ry, rx, g, 4f:4f+4, 0:4])
      epilogue  out[Y, X, F] = requantize(acc)

the register tile as conv2d.py's (``common.register_tile`` with the lane operand: one 16-byte
load of a pixel's channels serves 4 ``sdot`` steps as one float vector serves 4 ``fmla``), over
groups of 4 input channels instead of channels. The shifted activations are computed where
they are read: ``signed`` is computed at the group loop, 16 channels of the tile's pixels at a
time (``sdot v.4s, v.16b, v.4b[i]`` reads its lane; 8 channels when 16 do not divide the
channels, ``lane_steps``). A convolution that pads its input writes ``signed`` once, whole
(parallel, vectorised: no border test in the loop), and copies the tile's 16 channels from
it at the group loop. With an odd number of groups every ``sdot`` loads its 4 bytes broadcast.
"""

from __future__ import annotations

from edgec.targets.schedules.common import (
    Rule,
    epilogue_block,
    extents,
    inline_producers,
    register_tile,
    schedule_injective,
    split_init,
    split_tiles,
    tile_nest,
)
from edgec.targets.schedules.dot_kernels import ANCHOR, SIGNED

SDOT_INTRIN = "edgec_sdot_4x4_lane"


def register_sdot() -> str:
    """Register (once) and name the tensor intrinsic ``C[4] int32 += sum_k A[k] * B[4, k]``, A int8
    [4] (one int32, broadcast), B int8 [4, 4]: TVM's ``dot_4x4_i8i8s32_sdot`` description, with the
    broadcast A as sdot's last operand, the one the indexed form ``sdot v.4s, v.16b, v.4b[i]`` reads
    from a lane (TVM's own passes it first: LLVM then writes a ``dup`` before every ``sdot``)."""
    from tvm.s_tir import TensorIntrin
    from tvm.s_tir.tensor_intrin.arm_cpu import get_dotprod_intrin
    from tvm.script import tirx as T

    try:
        TensorIntrin.get(SDOT_INTRIN)
        return SDOT_INTRIN
    except ValueError:
        pass
    description, _ = get_dotprod_intrin("int8", "int32")

    @T.prim_func(s_tir=True)
    def implementation(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), dtype="int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), dtype="int8", offset_factor=1)
        C = T.match_buffer(c, (4,), dtype="int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            # one expression: a named value would be a "local" buffer, allocated from the workspace per call
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C.vload([0], dtype="int32x4"), B.vload([0, 0], dtype="int8x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16"),
                dtype="int32x4",
            )

    TensorIntrin.register(SDOT_INTRIN, description, implementation)
    return SDOT_INTRIN


class Conv2DDot(Rule):
    """The schedule above, for the kernels dot_graph.py writes (blocks ``conv2d_nhwc_dot``)."""

    name = "conv2d-dot"

    def apply(self, func):
        sch, anchor = self.schedule_reduction(func, ANCHOR)
        if anchor is None:
            return None
        signed = sch.get_sblock(SIGNED)
        epilogue = epilogue_block(sch, anchor, self.vector.lanes)
        inline_producers(sch, signed)  # a pad Relax fused in front: into the shift
        n, y, x, f, ry, rx, group, lane = sch.get_loops(anchor)
        _, height, width, channels, groups = extents(sch, [n, y, x, f, group])
        vector = self.vector
        steps = lane_steps(groups, vector.lanes)
        lane_operand = steps > 1
        padded = pads(sch, signed)
        (tile_y, tile_x), tile_f = register_tile([height, width], channels, vector, lane_operand=lane_operand)
        (y_outer, x_outer, f_outer), (y_inner, x_inner, f_inner) = split_tiles(sch, [y, x, f], [tile_y, tile_x, tile_f])
        registers, four = sch.split(f_inner, [None, vector.lanes])
        data, weight = _operands(sch, anchor, signed)
        weight_stationary = _size(weight) > _size(data)
        outer = [f_outer, n, y_outer, x_outer] if weight_stationary else [n, y_outer, x_outer, f_outer]
        tile_nest(sch, anchor, epilogue, outer, [ry, rx, group, y_inner, x_inner, registers, four, lane], vector.lanes)
        if padded or not lane_operand:
            schedule_injective(sch, signed, vector.lanes_of("int8"))  # written once, whole
        if lane_operand:
            group, steps = sch.split(group, [None, steps])
            if padded:  # a copy of the tile's 16 channels from the padded input (border tests stay out of the loop)
                signed = sch.cache_read(anchor, read_index(sch, anchor, data), "global")
            copy_at(sch, anchor, signed, group)
            sch.unroll(steps)
        for loop in (y_inner, x_inner, registers):
            sch.unroll(loop)
        split_init(sch, anchor, ry, 3)
        sch.tensorize(four, register_sdot())
        return sch


def lane_steps(groups: int, lanes: int) -> int:
    """Groups of 4 channels one copied vector of activations serves: the most of ``lanes``
    (16 bytes), ``lanes / 2`` (8) that divides ``groups``; 1: none, each ``sdot`` loads its 4
    bytes broadcast. Unlike a float FMA (``wants_lane_broadcast``), one vector is worth copying:
    aarch64's broadcast load ``ld1r`` takes no offset, each costs an address ``add`` too."""
    return next((steps for steps in (lanes, lanes // 2) if steps > 1 and groups % steps == 0), 1)


def copy_at(sch, anchor, signed, loop) -> None:
    """Compute ``signed`` (the tile's shifted activations) at ``loop`` of the anchor: its
    innermost axis vectorised, the rest unrolled."""
    sch.compute_at(signed, loop, preserve_unit_loops=True)
    depth = 1 + [sch.get(outer) for outer in sch.get_loops(anchor)].index(sch.get(loop))
    copy = sch.get_loops(signed)[depth:]
    sch.vectorize(copy[-1])
    for inner in copy[:-1]:
        sch.unroll(inner)


def pads(sch, signed) -> bool:
    """Whether the shifted activations hold a padding border (an ``if_then_else``)."""
    import tvm

    return bool(tvm.get_global_func("s_tir.schedule.HasIfThenElse")(sch.get(signed)))


def _operands(sch, anchor, signed):
    """(activation buffer, weight buffer) the anchor reads."""
    stmt = sch.get(anchor)
    data = sch.get(signed).writes[0].source
    weights = [r.source for r in stmt.reads if not r.source.same_as(data) and not r.source.same_as(stmt.writes[0].source)]
    return data, weights[0]


def read_index(sch, block, buffer) -> int:
    return [region.source.same_as(buffer) for region in sch.get(block).reads].index(True)


def _size(buffer) -> int:
    size = 1
    for dim in buffer.shape:
        size *= int(dim)
    return size
