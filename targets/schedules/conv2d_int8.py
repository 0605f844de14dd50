"""int8 convolutions on a CPU with a 4-way int8 dot product (x86 AVX-512 VNNI ``vpdpbusd``).

qdq_integer.py writes a QDQ convolution as ``conv2d(x_q uint8, W_q int8, out_dtype=int32)``;
after the layout pass it is NHWC/HWIO. Scheduled like a float convolution (conv2d.py) each
byte is widened to an int32 lane and one ``vpdpwssd`` does 16 MACs. ``vpdpbusd`` multiplies
4 uint8 by 4 int8 and adds the 4 products into each int32 lane: 64 MACs per zmm instruction,
when 4 consecutive input channels of one output channel sit in one 32-bit lane. So:

Graph rewrite (after the layout pass, before LegalizeOps): such a ``conv2d`` (groups 1,
constant weights, input channels a multiple of 4, output channels a multiple of 8)
becomes a ``call_te`` of

    out[n, y, x, f] = sum_{ry, rx, rc} int32(pad[n, y*s + ry*d, x*s + rx*d, rc])
                                        * int32(P[f // L, ry, rx, rc // 4, f % L, rc % 4])

with the weights ``P`` repacked here, in NumPy, once: ``[O/L][KH][KW][I/4][L][4]`` int8 (a
constant of the module, the same bytes as HWIO); ``L`` = 16 int32 lanes (zmm), or 8 (ymm,
AVX-512VL) when the output channels are not a multiple of 16 (MobileNetV2's 24). ``pad`` pads with 0 as the conv2d did
(qdq_integer.py already wrote the zero point's padding as an explicit ``pad`` before it).
FuseOps fuses the kernel with the requantize epilogue as it did the conv2d (the kernel is
marked out-element-wise fusable, as TVM marks a conv2d).

Schedule (``Conv2DInt8Dot``), conv2d.py's register tile with the reduction in steps of 4:

    parallel  (n, y/Y, x/X, f/F)  or (f/F, n, y/Y, x/X) when the weights are the bigger operand
      init      acc[Y, X, F] = 0
      for ry, rx, rc/4:
        for Y, X, F/L: (unrolled)
          acc[y, x, f:f+L] = vpdpbusd(acc, broadcast(int32 of pad[..., rc:rc+4]), P[f/L, ry, rx, rc/4])
      epilogue  out[Y, X, F] = g(acc)

The Lx4 step is a tensor intrinsic (``sch.tensorize``): the description of TVM's
``dot_16x4_vnni`` with an implementation for the LLVM in the wheel (22), whose ``llvm.x86.avx512.vpdpbusd.512``
takes its products' operands as ``<64 x i8>`` (TVM's own implementation passes ``<16 x i32>``,
which LLVM 22 refuses). Input channels
not a multiple of 4 (an RGB stem), output channels not a multiple of 8, depthwise and
grouped convolutions keep the float-style path; so does a CPU without VNNI (AVX2).
"""

from __future__ import annotations

import logging

import numpy as np

from edgec.core.fallbacks import FallbackLog
from edgec.targets.schedules.common import Rule, epilogue_block, extents, register_tile, split_init, split_tiles, tile_nest
from edgec.targets.schedules.conv2d import inline_inputs
from edgec.targets.schedules.guard import describe_call
from edgec.targets.schedules.te_rewrite import conv2d_rewriter, not_dense_nhwc, rewrite_module

log = logging.getLogger(__name__)

RULE = "graph:int8-dot"
KERNEL = "conv2d_nhwc_int8_dot"  # "conv2d" in the name: the profiler maps it to the Conv node (edgec/kernels.py)
BLOCK = "conv2d_int8_dot"
PAD_BLOCK = "pad_int8_dot"
DOT_LANES = (16, 8)  # int32 lanes of one vpdpbusd: zmm, ymm
DOT_DEPTH = 4  # uint8 x int8 products summed into each lane
OUT_EWISE_FUSABLE = 4  # relax's OpPatternKind kOutEWiseFusable, what TVM gives a conv2d


def ineligible(call, weight) -> str | None:
    """Why the Relax ``call`` cannot take the int8 dot-product kernel, or None; ``weight`` is
    its weight as a NumPy array (None when not a constant)."""
    reason = not_dense_nhwc(call, weight)
    if reason is not None:
        return reason
    dtypes = (str(call.args[0].ty.dtype), str(weight.dtype), str(call.ty.dtype))
    if dtypes != ("uint8", "int8", "int32"):
        return f"dtypes {dtypes}, not uint8 x int8 -> int32"
    if any(not hasattr(dim, "value") for dim in (*call.args[0].ty.shape, *call.ty.shape)):
        return "the shapes are not static"
    channels, filters = weight.shape[2], weight.shape[3]
    if channels % DOT_DEPTH or filters % DOT_LANES[-1]:
        return f"{channels} -> {filters} channels: not multiples of {DOT_DEPTH} -> {DOT_LANES[-1]}"
    return None


def pack_weights(weight: np.ndarray) -> np.ndarray:
    """HWIO int8 weights -> ``[O/L][KH][KW][I/4][L][4]``: 4 input channels of one output
    channel per 32-bit lane, ``L`` (``dot_lanes``) output channels per vector."""
    kh, kw, channels, filters = weight.shape
    lanes = dot_lanes(filters)
    blocked = weight.reshape(kh, kw, channels // DOT_DEPTH, DOT_DEPTH, filters // lanes, lanes)
    return np.ascontiguousarray(blocked.transpose(4, 0, 1, 2, 5, 3))


def dot_lanes(filters: int) -> int:
    """The int32 lanes of the vectors a convolution with ``filters`` output channels uses."""
    return next(lanes for lanes in DOT_LANES if filters % lanes == 0)


def conv2d_int8_dot(data, packed, strides, padding, dilation, out_shape):
    """The TE compute above: ``data`` NHWC uint8, ``packed`` (``pack_weights``) int8 -> NHWC int32."""
    from tvm import te, tirx

    batch, out_h, out_w, filters = out_shape
    top, left, bottom, right = padding
    if any(padding):
        _, height, width, channels = (int(dim) for dim in data.shape)
        source = data

        def padded(n, y, x, c):
            inside = tirx.all(y >= top, y < top + height, x >= left, x < left + width)
            return tirx.if_then_else(inside, source[n, y - top, x - left, c], tirx.const(0, "uint8"))

        data = te.compute((batch, height + top + bottom, width + left + right, channels), padded, name=PAD_BLOCK)
    _, kh, kw, blocks, lanes, depth = (int(dim) for dim in packed.shape)
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rc = te.reduce_axis((0, blocks * depth), name="rc")
    (sh, sw), (dh, dw) = strides, dilation

    def product(n, y, x, f):
        pixel = data[n, y * sh + ry * dh, x * sw + rx * dw, rc].astype("int32")
        return te.sum(pixel * packed[f // lanes, ry, rx, rc // depth, f % lanes, rc % depth].astype("int32"), axis=[ry, rx, rc])

    return te.compute((batch, out_h, out_w, filters), product, name=BLOCK)


def int8_dot_conv2d(fallbacks: FallbackLog | None = None):
    """A module pass rewriting the eligible int8 convolutions (module docstring)."""
    import tvm
    from tvm import relax

    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    def decide(call, weight):
        reason = ineligible(call, weight)
        if reason is not None:
            log.debug("%s: not an int8 dot-product convolution (%s)", describe_call(call), reason)
        return None if reason is not None else True

    def rewrite(mutator, call, weight, _choice):
        attrs = call.attrs
        strides = [int(s) for s in attrs.strides]
        padding = [int(p) for p in attrs.padding]
        dilation = [int(d) for d in attrs.dilation]
        out_shape = [int(dim) for dim in call.ty.shape]
        packed = relax.const(pack_weights(weight), "int8")
        kernel = mutator.builder_.call_te(lambda x, w: conv2d_int8_dot(x, w, strides, padding, dilation, out_shape),
                                          call.args[0], packed, primfunc_name_hint=KERNEL)  # fmt: skip
        mutator.patterns.append((kernel.args[0], OUT_EWISE_FUSABLE))
        return kernel

    _Rewriter = conv2d_rewriter(decide, rewrite, RULE, fallbacks, "kept as an int32-lane convolution")

    @tvm.transform.module_pass(opt_level=0, name="EdgecInt8DotConv2d")
    def _pass(mod, _ctx):
        rewritten, rewriter = rewrite_module(mod, _Rewriter)
        if rewriter.patterns:
            log.info("int8-dot: %d convolution(s) take the vpdpbusd kernel", len(rewriter.patterns))
        return rewritten

    return _pass


def dot_intrinsic(lanes: int) -> str:
    """The name of the registered ``lanes`` x 4 uint8 x int8 -> int32 ``vpdpbusd`` tensor
    intrinsic (``lanes`` 16: zmm, 8: ymm)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    name = f"edgec_dot_{lanes}x4_u8i8i32_vnni"
    # not tvm.s_tir.tensor_intrin.x86: importing it parses all of TVM's ~250 intrinsics
    # (CUDA's too), minutes on a loaded machine
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    llvm = f"llvm.x86.avx512.vpdpbusd.{lanes * 32}"
    accumulator, products = f"int32x{lanes}", f"int8x{lanes * 4}"

    @T.prim_func(s_tir=True)
    def description(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def vpdpbusd(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            pixel = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm),
                C.vload([0], dtype=accumulator),
                T.reinterpret(T.broadcast(pixel, lanes), dtype=products),
                B.vload([0, 0], dtype=products),
                dtype=accumulator,
            )

    TensorIntrin.register(name, description, vpdpbusd)
    return name


class Conv2DInt8Dot(Rule):
    """``conv2d_int8_dot`` kernels: conv2d.py's register tile, each 16 (or 8) output channels
    x 4 input channels step one ``vpdpbusd`` (module docstring)."""

    name = "conv2d-int8-dot"

    def apply(self, func):
        sch, anchor = self.schedule_reduction(func, BLOCK)
        if anchor is None:
            return None
        lanes = self.vector.lanes
        epilogue = epilogue_block(sch, anchor, self.vector.lanes)
        n, y, x, f, ry, rx, rc = sch.get_loops(anchor)
        inline_inputs(sch, anchor, lanes, materialise_padding=True)  # the dot reads 4 channels as one int32
        _, height, width, channels = extents(sch, [n, y, x, f])
        (tile_y, tile_x), tile_f = register_tile([height, width], channels, self.vector)
        lanes_f = dot_lanes(tile_f)
        if lanes_f != _packed_lanes(sch.get(anchor)):
            return None
        (y_outer, x_outer, f_outer), (y_inner, x_inner, f_inner) = split_tiles(sch, [y, x, f], [tile_y, tile_x, tile_f])
        f_vectors, f_lanes = sch.split(f_inner, [None, lanes_f])
        rc_outer, rc_inner = sch.split(rc, [None, DOT_DEPTH])
        block = sch.get(anchor)
        weight, data = _operand_sizes(block)
        outer = [f_outer, n, y_outer, x_outer] if weight > data else [n, y_outer, x_outer, f_outer]
        tile_nest(sch, anchor, epilogue, outer, [ry, rx, rc_outer, y_inner, x_inner, f_vectors, f_lanes, rc_inner], lanes)
        for loop in (y_inner, x_inner, f_vectors):
            sch.unroll(loop)
        split_init(sch, anchor, ry, 3)
        sch.tensorize(f_lanes, dot_intrinsic(lanes_f))
        return sch


def _operand_sizes(block) -> tuple[int, int]:
    """(weight elements, data elements) the convolution block reads: the int8 and the uint8 buffer."""
    sizes = {}
    for region in block.reads:
        size = 1
        for dim in region.source.shape:
            size *= int(dim)
        sizes[str(region.source.dtype)] = size
    return sizes["int8"], sizes["uint8"]


def _packed_lanes(block) -> int:
    """``L`` of the packed weights ``[O/L][KH][KW][I/4][L][4]`` the block reads."""
    return next(int(region.source.shape[4]) for region in block.reads if len(region.source.shape) == 6)
