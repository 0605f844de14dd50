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
from onnx.reference.op_run import OpRun

from edgec.ops import DOMAIN, CustomOp, register
from edgec.ops._relax import STACK_TILE_BYTES
from edgec.targets.vector import CpuVector, cpu_vector, vectorize_innermost

log = logging.getLogger(__name__)

__all__ = [
    "ACTIVATIONS",
    "BINARIZATIONS",
    "ENCODINGS",
    "BinaryConv",
    "BinaryGemm",
    "ConvShape",
    "XnorPlan",
    "apply_activation",
    "binarize",
    "conv2d_nchw",
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
ACTIVATIONS = ("none", "Relu", "Clip")


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


def apply_activation(y: np.ndarray, activation: str, low: float, high: float) -> np.ndarray:
    """``none``, ``Relu`` or ``Clip`` of ``y`` (dtype kept)."""
    if activation == "none":
        return y
    if activation == "Relu":
        return np.maximum(y, 0).astype(y.dtype)
    if activation == "Clip":
        return np.clip(y, low, high).astype(y.dtype)
    raise ValueError(f"unknown activation {activation!r}; one of {', '.join(ACTIVATIONS)}")


def conv2d_nchw(
    x: np.ndarray,
    weight: np.ndarray,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
) -> np.ndarray:
    """A dense NCHW convolution in float64 (zero padding, ONNX pad order top, left, bottom, right)."""
    top, left, bottom, right = pads
    padded = np.pad(np.asarray(x, dtype=np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_channels, per_group, kh, kw = weight.shape
    sh, sw = strides
    dh, dw = dilations
    out_h = (padded.shape[2] - (kh - 1) * dh - 1) // sh + 1
    out_w = (padded.shape[3] - (kw - 1) * dw - 1) // sw + 1
    y = np.zeros((x.shape[0], out_channels, out_h, out_w))
    w64 = np.asarray(weight, dtype=np.float64)
    out_per_group = out_channels // group
    for g in range(group):
        outs = slice(g * out_per_group, (g + 1) * out_per_group)
        ins = slice(g * per_group, (g + 1) * per_group)
        for i in range(kh):
            for j in range(kw):
                window = padded[:, ins, i * dh : i * dh + (out_h - 1) * sh + 1 : sh, j * dw : j * dw + (out_w - 1) * sw + 1 : sw]
                y[:, outs] += np.einsum("oc,nchw->nohw", w64[outs, :, i, j], window)
    return y


def text_attribute(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def epilogue_reference(dot: np.ndarray, scale, bias, channel_shape, activation, low, high) -> np.ndarray:
    """``act(float32(dot) * scale + bias)`` in float32, as the kernel computes it."""
    y = dot.astype(np.float32) * np.asarray(scale, dtype=np.float32).reshape(channel_shape)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32).reshape(channel_shape)
    return apply_activation(y.astype(np.float32), text_attribute(activation), float(low), float(high))


class BinaryConv(OpRun):
    """NumPy reference: ``act(conv(b(x), u) * scale + bias)``, see the module docstring."""

    op_domain = DOMAIN

    def _run(  # noqa: PLR0913 - the op's inputs and attributes
        self,
        x,
        weight_bits,
        scale,
        bias=None,
        encoding="sign",
        binarize_input="none",
        kernel_shape=None,
        strides=None,
        pads=None,
        dilations=None,
        group=1,
        activation="none",
        activation_min=float("-inf"),
        activation_max=float("inf"),
    ):
        group = int(group or 1)
        per_group = x.shape[1] // group
        bits = unpack_bits(weight_bits, per_group)  # (O, kh, kw, C/g)
        unit = np.moveaxis(unit_weights(bits, text_attribute(encoding)), 3, 1)  # (O, C/g, kh, kw)
        if kernel_shape is not None and tuple(kernel_shape) != unit.shape[2:]:
            raise ValueError(f"kernel_shape {tuple(kernel_shape)} but weight bits of {unit.shape[2:]}")
        dot = conv2d_nchw(
            binarize(x, text_attribute(binarize_input)), unit, strides or (1, 1), pads or (0, 0, 0, 0), dilations or (1, 1), group
        )
        return (epilogue_reference(dot, scale, bias, (1, -1, 1, 1), activation, activation_min, activation_max),)


class BinaryGemm(OpRun):
    """NumPy reference: ``act(b(A) @ u^T * scale + bias)``, see the module docstring."""

    op_domain = DOMAIN

    def _run(  # noqa: PLR0913 - the op's inputs and attributes
        self,
        a,
        weight_bits,
        scale,
        bias=None,
        encoding="sign",
        binarize_input="none",
        activation="none",
        activation_min=float("-inf"),
        activation_max=float("inf"),
    ):
        unit = unit_weights(unpack_bits(weight_bits, a.shape[1]), text_attribute(encoding))  # (N, K)
        dot = binarize(a, text_attribute(binarize_input)) @ unit.T
        return (epilogue_reference(dot, scale, bias, (1, -1), activation, activation_min, activation_max),)


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


def _activation_expr(activation: str, low: float, high: float):
    from tvm import tirx

    if activation == "none":
        return lambda value: value
    if activation == "Relu":
        return lambda value: tirx.max(value, tirx.const(0.0, "float32"))
    if activation == "Clip":
        lo = tirx.const(max(low, -3.0e38), "float32")
        hi = tirx.const(min(high, 3.0e38), "float32")
        return lambda value: tirx.min(tirx.max(value, lo), hi)
    raise ValueError(f"unknown activation {activation!r}; one of {', '.join(ACTIVATIONS)}")


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
    act = _activation_expr(activation, low, high)

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


def ints(attrs: dict, key: str, default: Sequence[int]) -> tuple[int, ...]:
    value = attrs.get(key)
    return tuple(int(item) for item in value) if value is not None else tuple(default)


def is_cuda(target) -> bool:
    return getattr(getattr(target, "preset", None), "kind", "llvm") == "cuda"


def relax_activation(expr, activation: str, low: float, high: float):
    from tvm import relax

    if activation == "Relu":
        return relax.op.nn.relu(expr)
    if activation == "Clip":
        return relax.op.clip(expr, max(low, -3.0e38), min(high, 3.0e38))
    return expr


def relax_binarize(expr, mode: str):
    """``b(x)`` as Relax ops (the CUDA fallback)."""
    from tvm import relax

    if mode == "sign":
        return relax.op.sign(expr)
    if mode == "sign_ge0":
        positive = relax.op.greater_equal(expr, relax.const(0.0, "float32"))
        return relax.op.where(positive, relax.const(1.0, "float32"), relax.const(-1.0, "float32"))
    return expr


def op_attributes(op: str, attrs: dict) -> tuple[str, str, str, float, float]:
    """(encoding, binarize_input, activation, low, high), validated."""
    from edgec.errors import BuildError

    encoding = text_attribute(attrs.get("encoding", "sign"))
    mode = text_attribute(attrs.get("binarize_input", "none"))
    activation = text_attribute(attrs.get("activation", "none"))
    for name, value, choices in (
        ("encoding", encoding, ENCODINGS),
        ("binarize_input", mode, BINARIZATIONS),
        ("activation", activation, ACTIVATIONS),
    ):
        if value not in choices:
            raise BuildError(f"{op}: unknown {name} {value!r}; one of {', '.join(choices)}")
    low = float(attrs.get("activation_min", float("-inf")))
    high = float(attrs.get("activation_max", float("inf")))
    return encoding, mode, activation, low, high


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


def emit_xnor_conv(bb, x, shape: ConvShape, bits, scale, bias, attrs: tuple, target):
    """Emit pack + popcount kernels for a binary-activation convolution; returns the output expr."""
    from tvm import relax

    from edgec.ops._relax import emit_kernel

    encoding, mode, activation, low, high = attrs
    vector = cpu_vector(target)
    plan = xnor_plan(shape, vector)
    log.info(
        "BinaryConv %dx%d %d->%d at %dx%d: %d-bit words, %d per vector (%s), tile %d channels x %d columns",
        *shape.kernel, shape.channels, shape.out_channels, shape.height, shape.width,
        plan.word_bits, plan.lanes, vector.popcount, plan.out_tile, plan.column_tile,
    )  # fmt: skip
    planes_type = relax.TensorType([shape.batch, *plan.plane_shape], plan.dtype)
    base_type = relax.TensorType([shape.batch, shape.out_height, plan.padded_width], "int32")
    pack = pack_kernel(shape, plan, mode, encoding)
    packed = bb.emit(emit_kernel(bb, pack, "edgec_binary_pack", [x], [planes_type, base_type]))
    planes, base = (bb.emit(relax.TupleGetItem(packed, index)) for index in range(2))
    words = weight_words(bits, shape.channels, encoding, plan.word_bits)
    kernel = xnor_conv_kernel(shape, plan, encoding, activation, low, high)
    kernel = kernel.with_attr("edgec.flops", 2.0 * shape.multiply_adds)
    out_type = relax.TensorType([shape.batch, shape.out_channels, shape.out_height, shape.out_width], "float32")
    args = [planes, base, relax.const(words), relax.const(scale), relax.const(bias)]
    return emit_kernel(bb, kernel, "edgec_xnor_conv", args, out_type)


def emit_decode(bb, anchor, bits_oc: np.ndarray, channels: int, scale: np.ndarray, planes: int, encoding: str, name: str):
    """Emit the run-time decode of packed weights (``(planes, O, kh, kw, ceil(C/8))``) to HWIO float32."""
    from tvm import relax

    from edgec.ops._relax import emit_kernel, tensor_type

    _, out_channels, kh, kw, _ = bits_oc.shape
    anchor_shape, _ = tensor_type(anchor)
    prim = decode_kernel(anchor_shape, (kh, kw), channels, out_channels, planes, encoding)
    packed = decode_bits(bits_oc, channels)
    out_type = relax.TensorType([kh, kw, channels, out_channels], "float32")
    return bb.emit(emit_kernel(bb, prim, name, [anchor, relax.const(packed), relax.const(scale)], out_type))


def float_weight_hwio(bits_oc: np.ndarray, channels: int, scale: np.ndarray, planes: int, encoding: str) -> np.ndarray:
    """Compile-time decode (CUDA fallback): ``(kh, kw, C, O)`` float32."""
    unpacked = unpack_bits(bits_oc, channels).astype(np.float64)  # (planes, O, kh, kw, C)
    unit = unpacked[0] * (1.0 - 2.0 * unpacked[1]) if planes == 2 else unit_weights(unpacked[0], encoding)
    weight = unit * np.asarray(scale, np.float64).reshape(-1, 1, 1, 1)
    return np.ascontiguousarray(np.transpose(weight, (1, 2, 3, 0))).astype(np.float32)


def emit_float_conv(bb, x, weight_hwio, attrs_conv: dict, bias, activation: tuple, mode: str = "none"):
    """``act(conv2d(b(x), w) + bias)`` with Relax ops; ``weight_hwio`` a Relax expr (HWIO)."""
    from tvm import relax

    strides, pads, dilations, group = attrs_conv["strides"], attrs_conv["pads"], attrs_conv["dilations"], attrs_conv["group"]
    data = relax_binarize(x, mode)
    conv = relax.op.nn.conv2d(
        data, weight_hwio, strides=strides, padding=pads, dilation=dilations, groups=group,
        data_layout="NCHW", kernel_layout="HWIO",
    )  # fmt: skip
    if bias is not None:
        conv = relax.op.add(conv, relax.const(np.asarray(bias, np.float32).reshape(1, -1, 1, 1)))
    return relax_activation(conv, *activation)


def conv_inputs(op: str, inputs, attrs: dict):
    """(x, bits, scale, bias or None, x shape, conv attributes) of a BinaryConv/TernaryConv call."""
    from edgec.errors import BuildError
    from edgec.ops._relax import constant, tensor_type

    if len(inputs) < 3 or any(item is None for item in inputs[:3]):
        raise BuildError(f"{op} takes inputs x, weight_bits, scale[, bias]")
    x = inputs[0]
    bits = constant(inputs[1], f"{op}'s weight bits").astype(np.uint8)
    scale = constant(inputs[2], f"{op}'s scale").astype(np.float32)
    bias = constant(inputs[3], f"{op}'s bias").astype(np.float32) if len(inputs) > 3 and inputs[3] is not None else None
    x_shape, dtype = tensor_type(x)
    if dtype != "float32" or len(x_shape) != 4:
        raise BuildError(f"{op} needs a float32 NCHW input, got {dtype} of shape {x_shape}")
    conv = {
        "strides": ints(attrs, "strides", (1, 1)),
        "pads": ints(attrs, "pads", (0, 0, 0, 0)),
        "dilations": ints(attrs, "dilations", (1, 1)),
        "group": int(attrs.get("group", 1)),
    }
    return x, bits, scale, bias, x_shape, conv


def lower_binary_conv(bb, inputs, attrs, target):
    """Binary activations: pack + xnor/popcount kernels; weight-only: run-time decode + conv2d."""
    from tvm import relax

    from edgec.errors import BuildError

    x, bits, scale, bias, x_shape, conv = conv_inputs("BinaryConv", inputs, attrs)
    encoding, mode, activation, low, high = op_attributes("BinaryConv", attrs)
    out_channels, kh, kw, _ = bits.shape
    per_group = x_shape[1] // conv["group"]
    if is_cuda(target):
        log.warning("BinaryConv on %s: no binary GPU kernel, weights decoded to float32 at compile time", target.spec)
        weight = float_weight_hwio(bits[None], per_group, scale, 1, encoding)
        return emit_float_conv(bb, x, relax.const(weight), conv, bias, (activation, low, high), mode)
    bias = np.zeros(out_channels, np.float32) if bias is None else bias
    if mode != "none":
        if conv["group"] != 1:
            raise BuildError("BinaryConv with binary activations needs group=1 (the pass lowers grouped convs weight-only)")
        shape = ConvShape(
            batch=x_shape[0], channels=x_shape[1], height=x_shape[2], width=x_shape[3], out_channels=out_channels,
            kernel=(kh, kw), strides=conv["strides"], pads=conv["pads"], dilations=conv["dilations"],
        )  # fmt: skip
        return emit_xnor_conv(bb, x, shape, bits, scale, bias, (encoding, mode, activation, low, high), target)
    weight = emit_decode(bb, x, bits[None], per_group, scale, 1, encoding, "edgec_binary_decode")
    return emit_float_conv(bb, x, weight, conv, bias, (activation, low, high))


def gemm_inputs(op: str, inputs):
    from edgec.errors import BuildError
    from edgec.ops._relax import constant, tensor_type

    if len(inputs) < 3 or any(item is None for item in inputs[:3]):
        raise BuildError(f"{op} takes inputs A, weight_bits, scale[, bias]")
    a = inputs[0]
    bits = constant(inputs[1], f"{op}'s weight bits").astype(np.uint8)
    scale = constant(inputs[2], f"{op}'s scale").astype(np.float32)
    bias = constant(inputs[3], f"{op}'s bias").astype(np.float32) if len(inputs) > 3 and inputs[3] is not None else None
    a_shape, dtype = tensor_type(a)
    if dtype != "float32" or len(a_shape) != 2:
        raise BuildError(f"{op} needs a float32 (M, K) input, got {dtype} of shape {a_shape}")
    return a, bits, scale, bias, a_shape


def emit_float_gemm(bb, a, weight_kn, bias, activation: tuple, mode: str = "none"):
    from tvm import relax

    y = relax.op.matmul(relax_binarize(a, mode), weight_kn)
    if bias is not None:
        y = relax.op.add(y, relax.const(np.asarray(bias, np.float32).reshape(1, -1)))
    return relax_activation(y, *activation)


def lower_binary_gemm(bb, inputs, attrs, target):
    """Binary activations: the conv kernels on ``A^T`` as a 1x1 conv over M positions;
    weight-only: run-time decode + matmul."""
    from tvm import relax

    a, bits, scale, bias, (rows, depth) = gemm_inputs("BinaryGemm", inputs)
    encoding, mode, activation, low, high = op_attributes("BinaryGemm", attrs)
    out_features = bits.shape[0]
    bits4 = bits.reshape(out_features, 1, 1, -1)
    if is_cuda(target):
        log.warning("BinaryGemm on %s: no binary GPU kernel, weights decoded to float32 at compile time", target.spec)
        weight = float_weight_hwio(bits4[None], depth, scale, 1, encoding).reshape(depth, out_features)
        return emit_float_gemm(bb, a, relax.const(weight), bias, (activation, low, high), mode)
    if mode != "none":
        bias = np.zeros(out_features, np.float32) if bias is None else bias
        x = bb.emit(relax.op.reshape(relax.op.permute_dims(a, [1, 0]), [1, depth, 1, rows]))
        shape = ConvShape(batch=1, channels=depth, height=1, width=rows, out_channels=out_features, kernel=(1, 1))
        y = bb.emit(emit_xnor_conv(bb, x, shape, bits4, scale, bias, (encoding, mode, activation, low, high), target))
        return relax.op.permute_dims(relax.op.reshape(y, [out_features, rows]), [1, 0])
    weight = emit_decode(bb, a, bits4[None], depth, scale, 1, encoding, "edgec_binary_decode")
    weight = bb.emit(relax.op.reshape(weight, [depth, out_features]))
    return emit_float_gemm(bb, a, weight, bias, (activation, low, high))


register(CustomOp("BinaryConv", BinaryConv, lower_binary_conv, "2-D convolution with 1-bit weights (xnor/popcount)"))
register(CustomOp("BinaryGemm", BinaryGemm, lower_binary_gemm, "Gemm with 1-bit weights (xnor/popcount)"))
