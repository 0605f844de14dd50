"""``edgec.BinaryConv`` and ``edgec.BinaryGemm``: layers whose weights are 1 bit per value.

The weight of output channel ``o`` is ``scale[o] * u`` with a unit weight
``u`` of one bit: ``encoding="sign"`` (XNOR-Net, RBNN, ReCU) reads a bit of 1
as ``u = -1`` and 0 as ``u = +1``; ``encoding="magnitude"`` (SiMaN) reads 1 as
``u = 1`` and 0 as ``u = 0``. The bits are stored little-endian along the
input channels, 8 to a byte (bit ``c % 8`` of byte ``c // 8``; the unused
bits of the last byte are 0)::

    BinaryConv  weight_bits  uint8 (C_out, kh, kw, ceil(C_in / group / 8))
    BinaryGemm  weight_bits  uint8 (N, ceil(K / 8))      (the unit weight of B^T)
    both        scale        float32 (C_out,)  /  (N,)
                bias         float32 (C_out,)  /  (N,)   optional

so a float32 weight takes 32x less room (plus one scale per channel). The
ops compute, with ``binarize_input`` one of

    none       b(x) = x                          (weight-only: float activations)
    sign       b(x) = Sign(x) in {-1, 0, +1}     (ONNX Sign: Sign(0) = 0)
    sign_ge0   b(x) = +1 if x >= 0 else -1       (Larq's ste_sign, where(x >= 0, 1, -1))

::

    dot[n, o, oh, ow] = sum_{c, i, j} b(x_pad)[n, c, oh*sh + i*dh, ow*sw + j*dw] * u[o, c, i, j]
    y = act(dot * scale[o] + bias[o])          act: none, Relu, Clip(activation_min, activation_max)

(Gemm: ``dot[m, n] = sum_k b(A)[m, k] * u[n, k]``; the pass folds Gemm's
alpha, beta and transB into the scale, the bias and the bit layout.) The
zero padding of a convolution pads ``b(x)`` with 0, not with a +-1 value:
padded taps contribute nothing, exactly as in the float model. The NumPy
reference computes ``dot`` in float64 (for binary activations an exact
integer) and ``dot * scale + bias`` in float32, as the kernel does.

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
inner loop. Two pre-scheduled TIR kernels:

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

A Gemm with binary activations is run by the same two kernels as a 1x1
convolution over a row of ``M`` positions (``A`` transposed to
``(1, K, 1, M)``).

Weight-only (``binarize_input="none"``): the packed weights stay packed in
the artifact and are decoded at run time by ``edgec_binary_decode`` into
float32 ``scale * u`` in HWIO layout (the layout the CPU conv schedules
want), followed by Relax's own ``conv2d`` / ``matmul``: the float
convolution costs what it costs in float, plus the decode. The decode kernel
takes the layer's input as an (unused) argument: TVM's FoldConstant
evaluates a ``call_tir`` whose arguments are all constants at compile time,
which would put the float32 weights back into the artifact.

CUDA has no binary kernel here: the weights are decoded at compile time and
the op lowers to dense Relax ops (a warning is logged).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
from edgec.ops import CustomOp, register
from edgec.errors import BuildError
from edgec.ops.common import (
    ACTIVATION_ATTRIBUTES,
    CONV_ATTRIBUTES,
    STACK_TILE_BYTES,
    Attributes,
    Reference,
    activation_expr,
    apply_activation,
    check_kernel_shape,
    conv2d_nchw,
    emit_kernel,
    float_input,
    is_cuda,
    op_inputs,
    relax_activation,
    tensor_type,
)
from edgec.targets.vector import CpuVector, cpu_vector, vectorize_innermost

log = logging.getLogger(__name__)

__all__ = [
    "BINARIZATIONS",
    "ENCODINGS",
    "BinaryConv",
    "BinaryGemm",
    "ConvShape",
    "XnorPlan",
    "binarize",
    "decode_kernel",
    "pack_bits",
    "pack_kernel",
    "unit_weights",
    "unpack_bits",
    "xnor_conv_kernel",
    "xnor_plan",
]

ENCODINGS = ("sign", "magnitude")
BINARIZATIONS = ("none", "sign", "sign_ge0")
# the attributes of BinaryConv / BinaryGemm
CODE_ATTRIBUTES = Attributes(
    {"encoding": "sign", "binarize_input": "none"}, {"encoding": ENCODINGS, "binarize_input": BINARIZATIONS}
)


# --------------------------------------------------------------------------
# The format and the NumPy reference.
# --------------------------------------------------------------------------


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack the last axis of a 0/1 array, 8 to a byte, little-endian: ``(..., C) -> (..., ceil(C/8))`` uint8."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``(..., ceil(count/8))`` uint8 -> ``(..., count)`` uint8 of 0/1."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.shape[-1] != -(-count // 8):
        raise ValueError(f"{packed.shape[-1]} bytes per row cannot hold {count} bits (need {-(-count // 8)})")
    return np.unpackbits(packed, axis=-1, count=count, bitorder="little")


def unit_weights(bits: np.ndarray, encoding: str) -> np.ndarray:
    """The unit weights (float64) of unpacked bits: sign 1 -> -1, 0 -> +1; magnitude 1 -> 1, 0 -> 0."""
    bits = np.asarray(bits, dtype=np.float64)
    if encoding == "sign":
        return 1.0 - 2.0 * bits
    if encoding == "magnitude":
        return bits
    raise ValueError(f"unknown encoding {encoding!r}; one of {', '.join(ENCODINGS)}")


def binarize(x: np.ndarray, mode: str) -> np.ndarray:
    """``b(x)`` of the module docstring, float64."""
    x = np.asarray(x, dtype=np.float64)
    if mode == "none":
        return x
    if mode == "sign":
        return np.sign(x)
    if mode == "sign_ge0":
        return np.where(x >= 0, 1.0, -1.0)
    raise ValueError(f"unknown binarize_input {mode!r}; one of {', '.join(BINARIZATIONS)}")


def epilogue_reference(dot: np.ndarray, scale, bias, channel_shape, attrs) -> np.ndarray:
    """``act(float32(dot) * scale + bias)`` in float32, as the kernel computes it."""
    y = dot.astype(np.float32) * np.asarray(scale, dtype=np.float32).reshape(channel_shape)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32).reshape(channel_shape)
    return apply_activation(y.astype(np.float32), attrs.activation, attrs.activation_min, attrs.activation_max)


class BinaryConv(Reference):
    """NumPy reference: ``act(conv(b(x), u) * scale + bias)``, see the module docstring."""

    ATTRIBUTES = CODE_ATTRIBUTES | CONV_ATTRIBUTES | ACTIVATION_ATTRIBUTES

    def compute(self, attrs, x, weight_bits, scale, bias=None):
        bits = unpack_bits(weight_bits, x.shape[1] // attrs.group)  # (O, kh, kw, C/g)
        unit = np.moveaxis(unit_weights(bits, attrs.encoding), 3, 1)  # (O, C/g, kh, kw)
        check_kernel_shape(attrs, unit.shape[2:], "weight bits")
        dot = conv2d_nchw(binarize(x, attrs.binarize_input), unit, attrs.strides, attrs.pads, attrs.dilations, attrs.group)
        return epilogue_reference(dot, scale, bias, (1, -1, 1, 1), attrs)


class BinaryGemm(Reference):
    """NumPy reference: ``act(b(A) @ u^T * scale + bias)``, see the module docstring."""

    ATTRIBUTES = CODE_ATTRIBUTES | ACTIVATION_ATTRIBUTES

    def compute(self, attrs, a, weight_bits, scale, bias=None):
        unit = unit_weights(unpack_bits(weight_bits, a.shape[1]), attrs.encoding)  # (N, K)
        dot = binarize(a, attrs.binarize_input) @ unit.T
        return epilogue_reference(dot, scale, bias, (1, -1), attrs)


# --------------------------------------------------------------------------
# Shapes and the register tile.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """Static shapes of one binary-activation convolution (NCHW, group 1)."""

    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)

    @property
    def out_height(self) -> int:
        top, _, bottom, _ = self.pads
        return (self.height + top + bottom - (self.kernel[0] - 1) * self.dilations[0] - 1) // self.strides[0] + 1

    @property
    def out_width(self) -> int:
        _, left, _, right = self.pads
        return (self.width + left + right - (self.kernel[1] - 1) * self.dilations[1] - 1) // self.strides[1] + 1

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


# --------------------------------------------------------------------------
# The TIR kernels.
# --------------------------------------------------------------------------


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
    planes: int,
    encoding: str = "sign",
):
    """The scheduled PrimFunc ``(anchor, bits, scale, w)``: packed weights -> float32 HWIO.

    ``bits``: uint8 ``(planes, kh, kw, in_channels, ceil(out_channels / 8))``, packed
    along the *output* channels (the lowering re-packs the op's layout at compile
    time) so that one byte feeds 8 vector lanes. One plane: ``w = scale * u`` (binary,
    ``encoding``); two planes (ternary): ``w = scale * nonzero * (1 - 2 * negative)``.
    ``anchor`` (the layer's input) is not read: it keeps FoldConstant from evaluating
    the decode at compile time (see the module docstring).
    """
    from tvm import s_tir, te, tirx

    kh, kw = kernel
    out_bytes = -(-out_channels // 8)
    anchor = te.placeholder(tuple(anchor_shape), "float32", name="anchor")
    bits = te.placeholder((planes, kh, kw, in_channels, out_bytes), "uint8", name="bits")
    scale = te.placeholder((out_channels,), "float32", name="scale")

    def bit(plane, i, j, c, o):
        return ((bits[plane, i, j, c, o // 8] >> (o % 8).astype("uint8")) & tirx.const(1, "uint8")).astype("float32")

    def compute(i, j, c, o):
        if planes == 2:
            unit = bit(0, i, j, c, o) * (tirx.const(1.0, "float32") - tirx.const(2.0, "float32") * bit(1, i, j, c, o))
        elif encoding == "sign":
            unit = tirx.const(1.0, "float32") - tirx.const(2.0, "float32") * bit(0, i, j, c, o)
        else:
            unit = bit(0, i, j, c, o)
        return scale[o] * unit

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


# --------------------------------------------------------------------------
# The Relax lowering.
# --------------------------------------------------------------------------


def relax_binarize(expr, mode: str):
    """``b(x)`` as Relax ops (the CUDA fallback)."""
    from tvm import relax

    if mode == "sign":
        return relax.op.sign(expr)
    if mode == "sign_ge0":
        positive = relax.op.greater_equal(expr, relax.const(0.0, "float32"))
        return relax.op.where(positive, relax.const(1.0, "float32"), relax.const(-1.0, "float32"))
    return expr


def weight_words(bits: np.ndarray, channels: int, encoding: str, word_bits: int) -> np.ndarray:
    """The op's uint8 bits ``(O, kh, kw, ceil(C/8))`` -> the kernel's sign-bit words
    ``(O, kh, kw, ceil(C / word_bits))`` (magnitude: the complement, ``u_sign = 2u - 1``)."""
    unpacked = unpack_bits(bits, channels)
    if encoding == "magnitude":
        unpacked = 1 - unpacked
    words = -(-channels // word_bits)
    padded = np.zeros((*unpacked.shape[:-1], words * word_bits), np.uint8)
    padded[..., :channels] = unpacked
    packed = pack_bits(padded)  # little-endian bytes = little-endian words
    return np.ascontiguousarray(packed).view(f"<u{word_bits // 8}").astype(f"uint{word_bits}")


def decode_bits(bits_oc: np.ndarray, channels: int) -> np.ndarray:
    """Re-pack op bits ``(planes, O, kh, kw, ceil(C/8))`` along the output channels:
    ``(planes, kh, kw, C, ceil(O/8))``, the layout :func:`decode_kernel` reads."""
    unpacked = unpack_bits(bits_oc, channels)  # (planes, O, kh, kw, C)
    return pack_bits(np.moveaxis(unpacked, 1, -1))


def emit_xnor_conv(bb, x, shape: ConvShape, bits, scale, bias, attrs, target):
    """Emit pack + popcount kernels for a binary-activation convolution; returns the output expr."""
    from tvm import relax

    vector = cpu_vector(target)
    plan = xnor_plan(shape, vector)
    log.info(
        "BinaryConv %dx%d %d->%d at %dx%d: %d-bit words, %d per vector (%s), tile %d channels x %d columns",
        *shape.kernel, shape.channels, shape.out_channels, shape.height, shape.width,
        plan.word_bits, plan.lanes, vector.popcount, plan.out_tile, plan.column_tile,
    )  # fmt: skip
    planes_type = relax.TensorType([shape.batch, *plan.plane_shape], plan.dtype)
    base_type = relax.TensorType([shape.batch, shape.out_height, plan.padded_width], "int32")
    pack = pack_kernel(shape, plan, attrs.binarize_input, attrs.encoding)
    packed = bb.emit(emit_kernel(bb, pack, "edgec_binary_pack", [x], [planes_type, base_type]))
    planes, base = (bb.emit(relax.TupleGetItem(packed, index)) for index in range(2))
    words = weight_words(bits, shape.channels, attrs.encoding, plan.word_bits)
    kernel = xnor_conv_kernel(shape, plan, attrs.encoding, attrs.activation, attrs.activation_min, attrs.activation_max)
    kernel = kernel.with_attr("edgec.flops", 2.0 * shape.multiply_adds)
    out_type = relax.TensorType([shape.batch, shape.out_channels, shape.out_height, shape.out_width], "float32")
    args = [planes, base, relax.const(words), relax.const(scale), relax.const(bias)]
    return emit_kernel(bb, kernel, "edgec_xnor_conv", args, out_type)


def float_weight_hwio(bits_oc: np.ndarray, channels: int, scale: np.ndarray, encoding: str) -> np.ndarray:
    """Compile-time decode of ``(planes, O, kh, kw, ceil(C/8))`` bits: ``(kh, kw, C, O)`` float32."""
    unpacked = unpack_bits(bits_oc, channels).astype(np.float64)  # (planes, O, kh, kw, C)
    unit = unpacked[0] * (1.0 - 2.0 * unpacked[1]) if len(unpacked) == 2 else unit_weights(unpacked[0], encoding)
    weight = unit * np.asarray(scale, np.float64).reshape(-1, 1, 1, 1)
    return np.ascontiguousarray(np.transpose(weight, (1, 2, 3, 0))).astype(np.float32)


def decoded_weight(bb, op: str, anchor, bits_oc, channels: int, scale, encoding: str, target, reshape=None):
    """The float32 weight of packed bits ``(planes, O, kh, kw, ceil(C/8))`` (one plane: binary
    with ``encoding``; two: ternary), HWIO or ``reshape``d: decoded at run time by
    ``edgec_binary_decode`` / ``edgec_ternary_decode`` (CPU; ``anchor`` is the layer's input,
    see :func:`decode_kernel`), at compile time on CUDA (with a warning)."""
    from tvm import relax

    planes, out_channels, kh, kw, _ = bits_oc.shape
    if is_cuda(target):
        log.warning("%s on %s: no GPU kernel for coded weights, weights decoded to float32 at compile time", op, target.spec)
        weight = float_weight_hwio(bits_oc, channels, scale, encoding)
        return relax.const(weight if reshape is None else weight.reshape(reshape))
    anchor_shape, _ = tensor_type(anchor)
    prim = decode_kernel(anchor_shape, (kh, kw), channels, out_channels, planes, encoding)
    name = "edgec_ternary_decode" if planes == 2 else "edgec_binary_decode"
    args = [anchor, relax.const(decode_bits(bits_oc, channels)), relax.const(scale)]
    weight = bb.emit(emit_kernel(bb, prim, name, args, relax.TensorType([kh, kw, channels, out_channels], "float32")))
    return weight if reshape is None else bb.emit(relax.op.reshape(weight, list(reshape)))


def emit_float_conv(bb, x, weight_hwio, attrs, bias, mode: str = "none"):
    """``act(conv2d(b(x), w) + bias)`` with Relax ops; ``weight_hwio`` a Relax expr (HWIO)."""
    from tvm import relax

    conv = relax.op.nn.conv2d(
        relax_binarize(x, mode), weight_hwio, strides=attrs.strides, padding=attrs.pads, dilation=attrs.dilations,
        groups=attrs.group, data_layout="NCHW", kernel_layout="HWIO",
    )  # fmt: skip
    if bias is not None:
        conv = relax.op.add(conv, relax.const(np.asarray(bias, np.float32).reshape(1, -1, 1, 1)))
    return relax_activation(conv, attrs.activation, attrs.activation_min, attrs.activation_max)


def emit_float_gemm(bb, a, weight_kn, attrs, bias, mode: str = "none"):
    """``act(b(A) @ w + bias)`` with Relax ops; ``weight_kn`` a Relax expr ``(K, N)``."""
    from tvm import relax

    y = relax.op.matmul(relax_binarize(a, mode), weight_kn)
    if bias is not None:
        y = relax.op.add(y, relax.const(np.asarray(bias, np.float32).reshape(1, -1)))
    return relax_activation(y, attrs.activation, attrs.activation_min, attrs.activation_max)


CODED_WEIGHTS = {"weight_bits": np.uint8, "scale": np.float32, "bias": np.float32}


def coded_inputs(op: str, inputs, layout: str):
    """(data, its shape, weight bits, scale, bias or None) of a Binary*/Ternary* call."""
    data, weights = op_inputs(op, inputs, "x" if layout == "NCHW" else "A", CODED_WEIGHTS, optional=("bias",))
    return data, float_input(op, data, layout), weights["weight_bits"], weights["scale"], weights["bias"]


def lower_binary_conv(bb, inputs, attrs, target):
    """Binary activations: pack + xnor/popcount kernels; weight-only: run-time decode + conv2d."""
    x, x_shape, bits, scale, bias = coded_inputs("BinaryConv", inputs, "NCHW")
    attrs = BinaryConv.ATTRIBUTES.read("BinaryConv", attrs, BuildError)
    out_channels, kh, kw, _ = bits.shape
    if not is_cuda(target):
        bias = np.zeros(out_channels, np.float32) if bias is None else bias
        if attrs.binarize_input != "none":
            if attrs.group != 1:
                raise BuildError("BinaryConv with binary activations needs group=1 (the pass lowers grouped convs weight-only)")
            shape = ConvShape(
                batch=x_shape[0], channels=x_shape[1], height=x_shape[2], width=x_shape[3], out_channels=out_channels,
                kernel=(kh, kw), strides=attrs.strides, pads=attrs.pads, dilations=attrs.dilations,
            )  # fmt: skip
            return emit_xnor_conv(bb, x, shape, bits, scale, bias, attrs, target)
    weight = decoded_weight(bb, "BinaryConv", x, bits[None], x_shape[1] // attrs.group, scale, attrs.encoding, target)
    return emit_float_conv(bb, x, weight, attrs, bias, attrs.binarize_input)


def lower_binary_gemm(bb, inputs, attrs, target):
    """Binary activations: the conv kernels on ``A^T`` as a 1x1 conv over M positions;
    weight-only: run-time decode + matmul."""
    from tvm import relax

    a, (rows, depth), bits, scale, bias = coded_inputs("BinaryGemm", inputs, "(M, K)")
    attrs = BinaryGemm.ATTRIBUTES.read("BinaryGemm", attrs, BuildError)
    out_features = bits.shape[0]
    bits4 = bits.reshape(out_features, 1, 1, -1)
    if attrs.binarize_input != "none" and not is_cuda(target):
        bias = np.zeros(out_features, np.float32) if bias is None else bias
        x = bb.emit(relax.op.reshape(relax.op.permute_dims(a, [1, 0]), [1, depth, 1, rows]))
        shape = ConvShape(batch=1, channels=depth, height=1, width=rows, out_channels=out_features, kernel=(1, 1))
        y = bb.emit(emit_xnor_conv(bb, x, shape, bits4, scale, bias, attrs, target))
        return relax.op.permute_dims(relax.op.reshape(y, [out_features, rows]), [1, 0])
    weight = decoded_weight(bb, "BinaryGemm", a, bits4[None], depth, scale, attrs.encoding, target, (depth, out_features))
    return emit_float_gemm(bb, a, weight, attrs, bias, attrs.binarize_input)


register(CustomOp("BinaryConv", BinaryConv, lower_binary_conv, "2-D convolution with 1-bit weights (xnor/popcount)"))
register(CustomOp("BinaryGemm", BinaryGemm, lower_binary_gemm, "Gemm with 1-bit weights (xnor/popcount)"))
