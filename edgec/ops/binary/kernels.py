"""The TIR kernels of coded-weight layers (CPU), pre-scheduled for the target's vectors.

Kernels (CPU). Binary activations (``sign``, ``sign_ge0``) run as integer
bit arithmetic on words of 64 bits (32 on armv7). ``b(x)`` takes three
values, so each activation is two bits: ``m`` (nonzero) and ``s`` (negative);
with ``w`` the weight's sign bit and ``word`` running over the packed input
channels of the window::

    acc  = sum popcount((s ^ w) & m)           per output channel and position
    cnt  = sum popcount(m)                     per position: the taps that count
    dot  = cnt - 2 * acc                       sign encoding
    dot  = (cnt - neg) - acc                   magnitude: u = (1 + u_sign) / 2, neg = sum popcount(s)

Padded taps and the channels beyond C_in have ``m = 0``: the correction for
zero padding (Larq computes it per border position) is the ``m`` plane,
and ``Sign(0) = 0`` is exact too. On AVX-512 LLVM fuses the ``xor`` and
``and`` into one ``vpternlogq``, so the mask costs no instruction in the
inner loop. Three pre-scheduled TIR kernels, the first two for binary activations:

1. ``edgec_binary_pack``: NCHW float32 -> the ``s`` and ``m`` words, laid out
   ``(N, rows, 2, words, stride_w, columns)`` (plane 0 ``s``, plane 1 ``m``)
   with the zero border already in place, and the per-position term ``cnt``
   (or ``cnt - neg``). Input column ``q * stride_w + phase`` is stored at
   ``[phase, q]``, so a strided convolution reads consecutive words for
   consecutive output columns. A parallel loop over padded rows computes its
   input row's bits (both planes from one load of ``x``, vectorised over
   columns, the bits of a word reduced serially) and writes the bordered
   row; a second parallel loop sums ``cnt`` per output row.
2. ``edgec_xnor_conv``: the popcount loop and the fused epilogue. A
   parallel loop over (image, output row, column vector, channel tile);
   inside, the window (kh, kw, words), then a register tile of ``out_tile``
   output channels x one vector of output columns; each weight word is
   broadcast, ``xor``/``and``/``popcount``/``add`` run on vectors of words
   (LLVM emits AVX-512 ``vpopcntq`` when the CPU has VPOPCNTDQ, a
   ``pshufb`` nibble count on AVX2, NEON ``vcnt`` + pairwise adds on ARM).
   The scale, bias and activation are applied to the tile before its one
   store. Output columns are padded up to whole vectors; the padded ones are
   computed and never stored. See :func:`xnor_plan` for the tile sizes.
3. ``edgec_binary_decode`` / ``edgec_ternary_decode`` (:func:`decode_kernel`):
   weight-only layers; packed weights -> float32 ``scale * u`` in HWIO at
   run time, for any :class:`~edgec.ops.binary.format.WeightCode` (one plane
   binary, two planes ternary).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from edgec.ops.binary.format import WeightCode
from edgec.ops.common import STACK_TILE_BYTES, ConvGeometry, activation_expr
from edgec.targets.vector import CpuVector, vectorize_innermost

__all__ = ["XNOR_OPERANDS", "ConvShape", "XnorPlan", "decode_kernel", "pack_kernel", "xnor_conv_kernel", "xnor_plan"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvShape(ConvGeometry):
    """Static shapes of one binary-activation convolution (NCHW, group 1)."""

    out_channels: int

    @property
    def multiply_adds(self) -> int:
        kh, kw = self.kernel
        return self.batch * self.out_channels * self.out_height * self.out_width * self.channels * kh * kw


@dataclasses.dataclass(frozen=True)
class XnorPlan:
    """Layout of the packed activations and the register tile of the popcount loop.

    ``words``: packed words per position (``ceil(C / word_bits)``).
    ``out_tile`` output channels x ``vectors`` vectors of ``lanes`` output
    columns are accumulated in registers; ``padded_width`` is the output
    width rounded up to whole tiles. The packed planes are
    ``(N, rows, 2, words, phases, columns)`` with ``phases = stride_w``;
    ``columns`` is a whole number of vectors.
    """

    vector: CpuVector
    words: int
    out_tile: int
    vectors: int
    padded_width: int
    rows: int
    phases: int
    columns: int

    @property
    def word_bits(self) -> int:
        """Bits of one packed word: the CPU's general-purpose register (64; 32 on armv7)."""
        return self.vector.word_bits

    @property
    def dtype(self) -> str:
        return self.vector.word_dtype

    @property
    def lanes(self) -> int:
        """Words per vector register."""
        return self.vector.lanes_of(self.dtype)

    @property
    def column_tile(self) -> int:
        return self.lanes * self.vectors

    @property
    def plane_shape(self) -> tuple[int, ...]:
        """``(rows, 2, words, phases, columns)``: plane 0 holds ``s``, plane 1 ``m``."""
        return (self.rows, 2, self.words, self.phases, self.columns)


# Vector registers the popcount loop keeps beside its accumulators: the broadcast weight word,
# the s and m vectors, the xor/and result and the popcount's temporaries.
XNOR_OPERANDS = 6


def xnor_plan(shape: ConvShape, vector: CpuVector) -> XnorPlan:
    """The register tile: one vector of output columns x ``out_tile`` output channels, the
    largest divisor of C_out within the accumulator budget (``XNOR_OPERANDS`` registers
    left for operands; at most 16) whose tile stays under 1 KiB.

    The 1 KiB is ``STACK_TILE_BYTES``: a larger tile (or a "local" one) becomes a
    TVMBackendAllocWorkspace call per iteration of the parallel loop. Measured
    on the x86 host (AVX-512, vpopcntq) for the 3x3 layers of a ResNet-18 BNN: 8 channels
    x 1 vector in registers took 0.074 / 0.078 / 0.069 ms at 64x56x56 / 256x14x14 /
    512x7x7, against 0.104 / 0.107 / 0.077 ms for 16 channels through the workspace;
    2-4 vectors of columns were up to 2x slower.
    """
    word_bits = vector.word_bits
    lanes = vector.lanes_of(vector.word_dtype)
    vectors = 1
    fits = (STACK_TILE_BYTES - 1) // (lanes * word_bits // 8)
    budget = max(1, min(16, vector.accumulator_budget(XNOR_OPERANDS), fits))
    out_tile = max(d for d in range(1, budget + 1) if shape.out_channels % d == 0)
    padded = -(-shape.out_width // lanes) * lanes
    sh, sw = shape.strides
    dh, dw = shape.dilations
    kh, kw = shape.kernel
    rows = (shape.out_height - 1) * sh + (kh - 1) * dh + 1
    columns = -(-(padded + ((kw - 1) * dw) // sw) // lanes) * lanes  # whole vectors
    words = -(-shape.channels // word_bits)
    return XnorPlan(vector, words, out_tile, vectors, padded, rows, sw, columns)


def _window(shape: ConvShape, n, oh, ow, kh, kw, word):
    """Index of the packed planes read by output (oh, ow) at tap (kh, kw)."""
    sh, sw = shape.strides
    dh, dw = shape.dilations
    return n, oh * sh + kh * dh, word, (kw * dw) % sw, ow + (kw * dw) // sw


def pack_kernel(shape: ConvShape, plan: XnorPlan, binarize_input: str, encoding: str):
    """The scheduled PrimFunc ``(x, planes, base)``: x NCHW float32 -> the packed ``s`` and
    ``m`` planes of ``b(x)`` with the zero border, ``(N, rows, 2, words, phases, columns)``,
    and ``base`` = cnt (sign) or cnt - neg (magnitude) per output position
    ``(N, OH, padded_width)`` int32.

    Two parallel loops: over padded rows (each computes its input row's bits, then
    writes the bordered row), then over output rows (``base``).
    """
    from tvm import s_tir, te, tirx

    batch, channels, height, width = shape.batch, shape.channels, shape.height, shape.width
    top, left, _, _ = shape.pads
    word, bits = plan.dtype, plan.word_bits
    one, zero = tirx.const(1, word), tirx.const(0, word)
    x = te.placeholder((batch, channels, height, width), "float32", name="x")
    bit = te.reduce_axis((0, bits), name="bit")
    float_zero = tirx.const(0.0, "float32")

    def row_bits(n, h, plane, j, w):
        c = j * bits + bit
        value = x[n, tirx.min(c, channels - 1), h, w]
        nonzero = value != float_zero if binarize_input == "sign" else tirx.const(True, "bool")
        is_set = tirx.Select(plane == 0, value < float_zero, nonzero)
        return te.sum(tirx.Select(tirx.all(c < channels, is_set), one << bit.var.astype(word), zero), axis=bit)

    packed = te.compute((batch, height, 2, plan.words, width), row_bits, name="bits")

    def bordered(n, r, plane, j, phase, q):
        h = r - top
        w = q * plan.phases + phase - left
        inside = tirx.all(h >= 0, h < height, w >= 0, w < width)
        h_safe = tirx.max(tirx.min(h, height - 1), 0)
        w_safe = tirx.max(tirx.min(w, width - 1), 0)
        return tirx.Select(inside, packed[n, h_safe, plane, j, w_safe], zero)

    planes = te.compute((batch, *plan.plane_shape), bordered, name="planes")
    kh = te.reduce_axis((0, shape.kernel[0]), "kh")
    kw = te.reduce_axis((0, shape.kernel[1]), "kw")
    j = te.reduce_axis((0, plan.words), "word")

    def base_term(n, oh, ow):
        row, word_index, phase, column = _window(shape, n, oh, ow, kh, kw, j)[1:]
        term = tirx.popcount(planes[n, row, 1, word_index, phase, column]).astype("int32")
        if encoding == "magnitude":
            term = term - tirx.popcount(planes[n, row, 0, word_index, phase, column]).astype("int32")
        return te.sum(term, axis=[kh, kw, j])

    base = te.compute((batch, shape.out_height, plan.padded_width), base_term, name="base")
    sch = s_tir.Schedule(te.create_prim_func([x, planes, base]))
    lanes = plan.lanes
    block = sch.get_sblock("planes")
    loops = sch.get_loops(block)
    rows = sch.fuse(loops[0], loops[1])
    sch.parallel(rows)
    vectorize_innermost(sch, loops[-1], lanes)
    bits_block = sch.get_sblock("bits")
    sch.compute_at(bits_block, rows, preserve_unit_loops=True)
    sch.set_scope(bits_block, 0, "local")  # one row per iteration of the parallel loop, private to it
    *_, plane_loop, word_loop, w, bit_loop = sch.get_loops(bits_block)
    sch.reorder(word_loop, bit_loop, plane_loop, w)  # both planes from one load of x
    vectorize_innermost(sch, w, lanes)
    sch.unroll(plane_loop)
    init = sch.decompose_reduction(bits_block, bit_loop)
    vectorize_innermost(sch, sch.get_loops(init)[-1], lanes)
    block = sch.get_sblock("base")
    n, oh, ow, r_kh, r_kw, r_word = sch.get_loops(block)
    sch.reorder(n, oh, r_kh, r_kw, r_word, ow)
    sch.parallel(sch.fuse(n, oh))
    vectorize_innermost(sch, ow, lanes)
    init = sch.decompose_reduction(block, r_kh)
    vectorize_innermost(sch, sch.get_loops(init)[-1], lanes)
    return sch.mod["main"]


def xnor_conv_kernel(
    shape: ConvShape, plan: XnorPlan, encoding: str, activation: str = "none", low: float = 0.0, high: float = 0.0
):
    """The scheduled PrimFunc ``(planes, base, weight_words, scale, bias, y)``, y NCHW float32."""
    from tvm import s_tir, te, tirx

    word = plan.dtype
    batch, out_channels = shape.batch, shape.out_channels
    out_h, out_w = shape.out_height, shape.out_width
    kh_size, kw_size = shape.kernel
    planes = te.placeholder((batch, *plan.plane_shape), word, name="planes")
    base = te.placeholder((batch, out_h, plan.padded_width), "int32", name="base")
    weight = te.placeholder((out_channels, kh_size, kw_size, plan.words), word, name="weight_words")
    scale = te.placeholder((out_channels,), "float32", name="scale")
    bias = te.placeholder((out_channels,), "float32", name="bias")
    kh = te.reduce_axis((0, kh_size), "kh")
    kw = te.reduce_axis((0, kw_size), "kw")
    j = te.reduce_axis((0, plan.words), "word")

    def popcounts(n, o, oh, ow):
        _, row, word_index, phase, column = _window(shape, n, oh, ow, kh, kw, j)
        signs = planes[n, row, 0, word_index, phase, column]
        mask = planes[n, row, 1, word_index, phase, column]
        return te.sum(tirx.popcount((signs ^ weight[o, kh, kw, j]) & mask), axis=[kh, kw, j])

    acc = te.compute((batch, out_channels, out_h, plan.padded_width), popcounts, name="xnor_popcount")
    factor = 2 if encoding == "sign" else 1
    act = activation_expr(activation, low, high)

    def epilogue(n, o, oh, ow):
        dot = base[n, oh, ow] - factor * acc[n, o, oh, ow].astype("int32")
        return act(dot.astype("float32") * scale[o] + bias[o])

    y = te.compute((batch, out_channels, out_h, out_w), epilogue, name="epilogue")
    sch = s_tir.Schedule(te.create_prim_func([planes, base, weight, scale, bias, y]))
    block = sch.get_sblock("xnor_popcount")
    n, o, oh, ow, r_kh, r_kw, r_word = sch.get_loops(block)
    o_outer, o_inner = sch.split(o, [None, plan.out_tile])
    ow_outer, ow_inner = sch.split(ow, [None, plan.column_tile])
    sch.reorder(n, oh, ow_outer, o_outer, r_kh, r_kw, r_word, o_inner, ow_inner)
    sch.reverse_compute_at(sch.get_sblock("epilogue"), o_outer)
    out_loops = sch.get_loops(sch.get_sblock("epilogue"))
    sch.unroll(out_loops[-2])
    sch.vectorize(out_loops[-1])
    sch.set_scope(block, 0, "global")  # under 1 KiB: a stack tile LLVM keeps in registers (see xnor_plan)
    sch.unroll(o_inner)
    sch.vectorize(ow_inner)
    sch.parallel(sch.fuse(n, oh, ow_outer, o_outer))
    init = sch.decompose_reduction(block, r_kh)
    init_loops = sch.get_loops(init)
    sch.unroll(init_loops[-2])
    sch.vectorize(init_loops[-1])
    return sch.mod["main"]


def decode_kernel(
    anchor_shape: Sequence[int],
    kernel: tuple[int, int],
    in_channels: int,
    out_channels: int,
    code: WeightCode,
):
    """The scheduled PrimFunc ``(anchor, bits, scale, w)``: packed weights -> float32 HWIO.

    ``bits``: uint8 ``(planes, kh, kw, in_channels, ceil(out_channels / 8))``, packed
    along the *output* channels (the lowering re-packs the op's layout at compile
    time) so that one byte feeds 8 vector lanes; ``planes`` is ``code.planes`` and
    ``w = scale * code.unit(bits)``. ``anchor`` (the layer's input) is not read: TVM's
    FoldConstant evaluates a ``call_tir`` whose arguments are all constants at
    compile time, which would put the float32 weights back into the artifact.
    """
    from tvm import s_tir, te, tirx

    kh, kw = kernel
    out_bytes = -(-out_channels // 8)
    anchor = te.placeholder(tuple(anchor_shape), "float32", name="anchor")
    bits = te.placeholder((code.planes, kh, kw, in_channels, out_bytes), "uint8", name="bits")
    scale = te.placeholder((out_channels,), "float32", name="scale")

    def bit(plane, i, j, c, o):
        return ((bits[plane, i, j, c, o // 8] >> (o % 8).astype("uint8")) & tirx.const(1, "uint8")).astype("float32")

    def compute(i, j, c, o):
        return scale[o] * code.unit([bit(plane, i, j, c, o) for plane in range(code.planes)])

    w = te.compute((kh, kw, in_channels, out_channels), compute, name="decode")
    sch = s_tir.Schedule(te.create_prim_func([anchor, bits, scale, w]))
    block = sch.get_sblock("decode")
    i, j, c, o = sch.get_loops(block)
    outer = sch.fuse(i, j, c)
    sch.parallel(outer)
    if out_channels % 8 == 0:
        _, o_inner = sch.split(o, [None, 8])
        sch.vectorize(o_inner)
    return sch.mod["main"]
