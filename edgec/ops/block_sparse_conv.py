"""``edgec.BlockSparseConv``: a 2-D convolution whose weight is 1xN block-sparse.

The weight ``W`` (``C_out x C_in x kh x kw``, ``C_out = B * N``) is cut into
blocks of ``N`` consecutive output channels at one input channel,
``W[b*N:(b+1)*N, c, :, :]`` (1xN pattern, arXiv 2105.14713). Only the kept
blocks are stored, block-row by block-row (CSR over blocks):

    indptr   int32 (B + 1,)         block-row b holds blocks indptr[b] .. indptr[b+1]-1
    indices  int32 (nnz,)           the input channel of each kept block
    values   float32 (nnz, N, kh, kw)   the block's N x kh x kw weights
    bias     float32 (C_out,)       always present (zeros when the Conv had none)

so ``W[b*N + j, indices[k], :, :] = values[k, j]`` for ``indptr[b] <= k <
indptr[b+1]`` and every other weight is 0. The op computes (NCHW, group 1)::

    y[n, b*N + j, oh, ow] = act(bias[b*N + j] + sum_{k in row b} sum_{kh, kw}
                                values[k, j, kh, kw] * x_pad[n, indices[k], oh*sh + kh*dh, ow*sw + kw*dw])

with ``act`` one of ``none``, ``Relu`` (``max(y, 0)``) and ``Clip``
(``min(max(y, activation_min), activation_max)``). Attributes: ``block_size``
(N), ``kernel_shape``, ``strides``, ``pads`` (ONNX order: top, left, bottom,
right), ``dilations``, ``activation``, ``activation_min``, ``activation_max``.

Kernel (CPU, ``lower_block_sparse_conv``): a pre-scheduled TIR PrimFunc
generated for the layer's shapes, channels-last (NHWC in and out, like the
CPU schedule library's dense kernels); the packed arrays are its arguments,
read at run time, so its work is ``nnz * N * kh * kw`` multiply-adds per
output position: it scales with the kept blocks, there is no loop over the
pruned ones. The loops: a parallel loop over (image, output row, tile of
positions, block-row) -- a pointwise conv runs all positions as one row --,
the kept blocks of the block-row (the reduction), the kernel window, then a
register tile of ``positions`` outputs x the block's N channels. The N
channels are the vector: one load of a block's N weights, multiplied with
one broadcast input per position (the paper's kernel, vectorised over the N
output channels: N = 4 fills a NEON register, 8 AVX2, 16 AVX-512; a smaller
N runs in narrower vectors). ``positions`` fills the register file (24
accumulators of 32 registers, 12 of 16) within 1 KiB (``STACK_TILE_BYTES``:
TVM puts a smaller tile on the stack, where LLVM keeps it in registers). The
accumulators start from the bias and the activation is applied to them
before the one store (the fused epilogue).

The lowering wraps the kernel in NCHW -> NHWC -> NCHW ``permute_dims``: the
ONNX graph is NCHW. Where the CPU schedule library makes the graph
channels-last, those transposes meet the layout pass's inverse ones and
``edgec.ops._relax.cancel_transposes`` removes both; without it (``compile(...,
schedules=False)``) they stay, two transposes per op.

CUDA has no sparse kernel here: the weights are decoded to dense and the op
lowers to a dense conv2d (a warning is logged).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np

from edgec.errors import BuildError
from edgec.ops import CustomOp, register
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
)
from edgec.targets.vector import CpuVector, cpu_vector

log = logging.getLogger(__name__)

__all__ = [
    "BlockSparseConv",
    "KernelPlan",
    "conv_kernel",
    "kernel_plan",
    "unpack_blocks",
    "warn_narrow_blocks",
]

# the packed arrays after the data input, in input order, with their dtypes
SPARSE_WEIGHTS = {"values": np.float32, "indices": np.int32, "indptr": np.int32, "bias": np.float32}
BLOCK_ATTRIBUTES = Attributes({"block_size": None})


# --------------------------------------------------------------------------
# The format and the NumPy reference.
# --------------------------------------------------------------------------


def unpack_blocks(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, in_channels: int) -> np.ndarray:
    """The dense weight the packed arrays stand for: ``(B*N, in_channels, *values.shape[2:])``.

    ``values`` is ``(nnz, N, ...)``; pruned blocks are zeros.
    """
    values = np.asarray(values)
    indices = np.asarray(indices, dtype=np.int64)
    indptr = np.asarray(indptr, dtype=np.int64)
    blocks = indptr.size - 1
    block_size = values.shape[1]
    tail = values.shape[2:]
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != indices.size or indices.size != values.shape[0]:
        raise ValueError(
            f"inconsistent block-sparse arrays: indptr {indptr.tolist()[:8]}..., {indices.size} indices, "
            f"{values.shape[0]} blocks of values"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= in_channels):
        raise ValueError(f"block indices out of range for {in_channels} input channels")
    dense = np.zeros((blocks, in_channels, block_size, *tail), dtype=values.dtype)
    rows = np.repeat(np.arange(blocks), np.diff(indptr))
    dense[rows, indices] = values
    dense = np.moveaxis(dense, 2, 1)  # (B, N, C, ...)
    return dense.reshape(blocks * block_size, in_channels, *tail)


def biased_activation(y: np.ndarray, bias, attrs, dtype) -> np.ndarray:
    """``act(y + bias)``: the bias added in float64, then ``dtype`` (the input's), then the activation."""
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(1, -1, *([1] * (y.ndim - 2)))
    return apply_activation(y.astype(dtype), attrs.activation, attrs.activation_min, attrs.activation_max)


def check_block_size(attrs, values: np.ndarray) -> None:
    if attrs.block_size is not None and values.shape[1] != attrs.block_size:
        raise ValueError(f"values hold blocks of {values.shape[1]} channels, block_size says {attrs.block_size}")


class BlockSparseConv(Reference):
    """NumPy reference: decode the blocks to a dense weight, convolve, add bias, activate."""

    ATTRIBUTES = BLOCK_ATTRIBUTES | CONV_ATTRIBUTES | ACTIVATION_ATTRIBUTES

    def compute(self, attrs, x, values, indices, indptr, bias=None):
        if attrs.group != 1:
            raise ValueError(f"BlockSparseConv convolves with group 1, not group={attrs.group}")
        check_block_size(attrs, values)
        weight = unpack_blocks(values, indices, indptr, x.shape[1])
        check_kernel_shape(attrs, weight.shape[2:], "blocks")
        y = conv2d_nchw(x, weight, attrs.strides, attrs.pads, attrs.dilations)
        return biased_activation(y, bias, attrs, x.dtype)


# --------------------------------------------------------------------------
# The CPU kernel.
# --------------------------------------------------------------------------

def warn_narrow_blocks(target, block_size: int, lanes: int) -> None:
    """Warn, once per (target, N), when a block's N channels fill less than a vector."""
    if block_size < lanes:
        _warn_narrow_blocks(getattr(target, "spec", "this machine"), block_size, lanes)


@functools.cache
def _warn_narrow_blocks(target: str, block_size: int, lanes: int) -> None:
    log.warning(
        "block-sparse N=%d on %s: the kernels vectorise over a block's N output channels and "
        "fill %d of the CPU's %d float lanes, so they can run slower than dense (README: "
        "block-sparse timings); prune with n=%d for this target",
        block_size, target, block_size, lanes, lanes,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """How one kernel tiles its registers: ``positions`` output positions x the
    block's N channels (``ceil(N / lanes)`` vectors each) are accumulated in
    registers while the kept blocks of a block-row are read once."""

    lanes: int
    positions: int

    def vectors(self, block_size: int) -> int:
        return -(-block_size // self.lanes)


def kernel_plan(block_size: int, extent: int, vector: CpuVector) -> KernelPlan:
    """The register tile for blocks of ``block_size`` channels over ``extent`` positions.

    Accumulators may use the register file less room for the weight vector
    and the broadcast inputs (``vector.accumulators``: 32 registers 24, 16
    registers 12), each position taking ``ceil(N / lanes)`` of them; and the tile must stay under
    ``STACK_TILE_BYTES`` (N=16: 15 positions). Measured on the x86 host (AVX-512, one
    thread), pointwise convs at 70%, N=16: 16->96 @112 0.156 ms with 24 positions through
    the workspace, 0.088 ms with 15 on the stack; 960->160 @7 0.0215 and 0.0226 ms.
    """
    per_position = -(-block_size // vector.lanes)
    fits_stack = (STACK_TILE_BYTES - 1) // (4 * block_size)
    return KernelPlan(vector.lanes, max(1, min(extent, vector.accumulators // per_position, fits_stack)))


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """Static shapes of one BlockSparseConv call (NCHW)."""

    batch: int
    channels: int
    height: int
    width: int
    blocks: int
    block_size: int
    nnz: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]

    @property
    def out_channels(self) -> int:
        return self.blocks * self.block_size

    @property
    def out_height(self) -> int:
        top, _, bottom, _ = self.pads
        return (self.height + top + bottom - (self.kernel[0] - 1) * self.dilations[0] - 1) // self.strides[0] + 1

    @property
    def out_width(self) -> int:
        _, left, _, right = self.pads
        return (self.width + left + right - (self.kernel[1] - 1) * self.dilations[1] - 1) // self.strides[1] + 1

    @property
    def pointwise(self) -> bool:
        """1x1, stride 1, no padding: the positions of a channel are one contiguous run."""
        return self.kernel == (1, 1) and self.strides == (1, 1) and not any(self.pads)

    @property
    def multiply_adds(self) -> int:
        """Work of the kernel: nnz * N * kh * kw per output position."""
        kh, kw = self.kernel
        return self.batch * self.out_height * self.out_width * self.nnz * self.block_size * kh * kw


def conv_kernel(shape: ConvShape, plan: KernelPlan, activation: str = "none", low: float = 0.0, high: float = 0.0):
    """The scheduled PrimFunc ``(x, values, indices, indptr, bias, y)`` for ``shape``, channels-last.

    ``x`` is NHWC ``(batch, H, W, C_in)``, ``y`` NHWC; ``values``, ``indices``,
    ``indptr`` and ``bias`` as in the op. Loops, outermost first: a parallel
    loop over (image, output row, tile of positions, block-row) -- a pointwise
    conv runs all ``batch*H*W`` positions as one row --, the kept blocks of
    the block-row (``indptr[b] .. indptr[b+1]``, the reduction), the kernel
    window, then the register tile: ``positions`` (unrolled) x the block's N
    channels (vectorised). Each kept block loads its N weights as one vector
    and multiplies it with one broadcast input per position. A row is cut into
    tiles of nearly equal size, none wider than ``plan.positions`` (49 ->
    17, 16, 16: no narrow tail tile paying a whole tile's loop overhead),
    all in one parallel loop (one fork/join per call). Padding, when there
    is any, is materialised first into a zero-bordered copy.
    """
    return _kernel(shape, plan, activation_expr(activation, low, high))


def _kernel(shape: ConvShape, plan: KernelPlan, act):
    from tvm.script import tirx as T

    batch, channels, n, blocks, nnz = shape.batch, shape.channels, shape.block_size, shape.blocks, shape.nnz
    out_channels = shape.out_channels
    x_shape = (batch, shape.height, shape.width, channels)
    y_shape = (batch, shape.out_height, shape.out_width, out_channels)
    kh, kw = shape.kernel
    if shape.pointwise:  # one row of batch*H*W positions: NHWC keeps them evenly strided
        images, height, width = 1, 1, batch * shape.height * shape.width
        out_h, out_w = 1, width
    else:
        images, height, width = batch, shape.height, shape.width
        out_h, out_w = shape.out_height, shape.out_width
    sh, sw = shape.strides
    dh, dw = shape.dilations
    top, left, bottom, right = shape.pads
    padded = any(shape.pads)
    padded_h, padded_w = height + top + bottom, width + left + right
    # a row of out_w positions in row_tiles tiles of (nearly) equal size, none wider than the plan's:
    # `wide` tiles of base + 1 positions, then tiles of base (49 -> 17, 16, 16 rather than 24, 24, 1)
    row_tiles = -(-out_w // plan.positions)
    base, wide = divmod(out_w, row_tiles)
    window = kh * kw

    @T.macro
    def register_tile(xf, vf, indices, indptr, bias, yf, image, oh, block, start, size):
        # ``size`` positions of output row ``oh`` from ``start``, x the N channels of ``block``
        acc = T.alloc_buffer((size, n), "float32")  # under STACK_TILE_BYTES: registers
        for t in T.unroll(size):
            for j in T.vectorized(n):
                acc[t, j] = bias[block * n + j]
        for k in range(indptr[block], indptr[block + 1]):
            for r in T.unroll(kh):
                for s in T.unroll(kw):
                    for t in T.unroll(size):
                        for j in T.vectorized(n):
                            acc[t, j] = acc[t, j] + vf[((k * window + r * kw + s) * n) + j] * xf[
                                ((image * padded_h + oh * sh + r * dh) * padded_w + (start + t) * sw + s * dw) * channels
                                + indices[k]
                            ]
        for t in T.unroll(size):
            for j in T.vectorized(n):
                yf[((image * out_h + oh) * out_w + start + t) * out_channels + block * n + j] = act(acc[t, j])

    @T.macro
    def main_loops(xf, vf, indices, indptr, bias, yf):
        # one parallel region: (image, output row, tile, block-row)
        for task in T.parallel(images * out_h * row_tiles * blocks):
            if wide > 0 and task // blocks % row_tiles < wide:
                register_tile(
                    xf, vf, indices, indptr, bias, yf,
                    task // (out_h * row_tiles * blocks), task // (row_tiles * blocks) % out_h, task % blocks,
                    task // blocks % row_tiles * (base + 1), base + 1,
                )  # fmt: skip
            else:
                register_tile(
                    xf, vf, indices, indptr, bias, yf,
                    task // (out_h * row_tiles * blocks), task // (row_tiles * blocks) % out_h, task % blocks,
                    wide * (base + 1) + (task // blocks % row_tiles - wide) * base, base,
                )  # fmt: skip

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer(x_shape, "float32"),
        values: T.Buffer((nnz, kh, kw, n), "float32"),
        indices: T.Buffer((nnz,), "int32"),
        indptr: T.Buffer((blocks + 1,), "int32"),
        bias: T.Buffer((out_channels,), "float32"),
        y: T.Buffer(y_shape, "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        xf = T.decl_buffer((images * height * width * channels,), "float32", data=x.data)
        vf = T.decl_buffer((nnz * window * n,), "float32", data=values.data)
        yf = T.decl_buffer((images * out_h * out_w * out_channels,), "float32", data=y.data)
        if padded:
            xp = T.decl_buffer((images * padded_h * padded_w * channels,), "float32")
            for row in T.parallel(images * padded_h):
                for col in range(padded_w):
                    for c in T.vectorized(channels):
                        xp[(row * padded_w + col) * channels + c] = T.if_then_else(
                            top <= row % padded_h
                            and row % padded_h < top + height
                            and left <= col
                            and col < left + width,
                            xf[((row // padded_h * height + row % padded_h - top) * width + col - left) * channels + c],
                            T.float32(0),
                        )
            main_loops(xp, vf, indices, indptr, bias, yf)
        else:
            main_loops(xf, vf, indices, indptr, bias, yf)

    return kernel


# --------------------------------------------------------------------------
# The Relax lowering.
# --------------------------------------------------------------------------


def sparse_inputs(op: str, inputs, layout: str):
    """(data, its shape, values, indices, indptr, bias) of a BlockSparseConv/Gemm call."""
    data, weights = op_inputs(op, inputs, "x", SPARSE_WEIGHTS)
    return data, float_input(op, data, layout), *weights.values()


def lower_block_sparse_conv(bb, inputs, attrs, target):
    """Emit the kernel as an opaque call_tir (CPU) or a dense conv2d (CUDA)."""
    from tvm import relax

    x, x_shape, values, indices, indptr, bias = sparse_inputs("BlockSparseConv", inputs, "NCHW")
    attrs = BlockSparseConv.ATTRIBUTES.read("BlockSparseConv", attrs, BuildError)
    activation, low, high = attrs.activation, attrs.activation_min, attrs.activation_max
    block_size = values.shape[1]
    shape = ConvShape(
        batch=x_shape[0], channels=x_shape[1], height=x_shape[2], width=x_shape[3],
        blocks=indptr.size - 1, block_size=block_size, nnz=indices.size,
        kernel=(values.shape[2], values.shape[3]),
        strides=attrs.strides, pads=attrs.pads, dilations=attrs.dilations,
    )  # fmt: skip
    if is_cuda(target):
        log.warning(
            "BlockSparseConv (%d of %d blocks kept) on %s: no sparse GPU kernel, decoded to a dense conv2d",
            shape.nnz, shape.blocks * shape.channels, target.spec,
        )  # fmt: skip
        weight = unpack_blocks(values, indices, indptr, shape.channels)
        top, left, bottom, right = shape.pads
        conv = relax.op.nn.conv2d(
            x, relax.const(weight), strides=shape.strides, padding=(top, left, bottom, right), dilation=shape.dilations
        )
        conv = relax.op.add(conv, relax.const(bias.reshape(1, -1, 1, 1)))
        return relax_activation(conv, activation, low, high)
    vector = cpu_vector(target)
    warn_narrow_blocks(target, block_size, vector.lanes)
    extent = shape.batch * shape.height * shape.width if shape.pointwise else shape.out_width
    plan = kernel_plan(block_size, extent, vector)
    kernel_shape = shape
    if shape.nnz == 0:  # every block pruned (the output is the bias): TIR takes no 0-sized buffer
        values, indices = np.zeros((1, *values.shape[1:]), np.float32), np.zeros(1, np.int32)
        kernel_shape = dataclasses.replace(shape, nnz=1)
    prim = conv_kernel(kernel_shape, plan, activation, low, high).with_attr("edgec.flops", 2.0 * shape.multiply_adds)
    # the kernel is channels-last: NCHW -> NHWC around it; after the CPU layout pass turns the
    # graph channels-last, these transposes meet their inverses and cancel (cancel_transposes)
    channels_last = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
    args = [
        channels_last,
        relax.const(np.ascontiguousarray(values.transpose(0, 2, 3, 1))),  # (nnz, kh, kw, N): N contiguous
        relax.const(indices),
        relax.const(indptr),
        relax.const(bias),
    ]
    nhwc = [shape.batch, shape.out_height, shape.out_width, shape.out_channels]
    y = bb.emit(emit_kernel(bb, prim, "edgec_block_sparse_conv", args, relax.TensorType(nhwc, "float32")))
    return relax.op.permute_dims(y, [0, 3, 1, 2])


register(
    CustomOp(
        "BlockSparseConv",
        BlockSparseConv,
        lower_block_sparse_conv,
        "2-D convolution with a 1xN block-sparse weight (kept blocks only), fused bias and activation",
    )
)
