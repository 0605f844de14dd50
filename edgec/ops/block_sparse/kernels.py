"""The TIR kernels of the block-sparse ops (CPU), pre-scheduled for the target's vectors.

Conv (:func:`conv_kernel`): a pre-scheduled TIR PrimFunc generated for the
layer's shapes, channels-last (NHWC in and out, like the CPU schedule
library's dense kernels); the packed arrays are its arguments, read at run
time, so its work is ``nnz * N * kh * kw`` multiply-adds per output
position: it scales with the kept blocks, there is no loop over the pruned
ones. The loops: a parallel loop over (image, output row, tile of positions,
block-row) -- a pointwise conv runs all positions as one row --, the kept
blocks of the block-row (the reduction), the kernel window, then a register
tile of ``positions`` outputs x the block's N channels. The N channels are
the vector: one load of a block's N weights, multiplied with one broadcast
input per position (the paper's kernel, vectorised over the N output
channels: N = 4 fills a NEON register, 8 AVX2, 16 AVX-512; a smaller N runs
in narrower vectors). ``positions`` fills the register file (24 accumulators
of 32 registers, 12 of 16) within 1 KiB (``STACK_TILE_BYTES``: TVM puts a
smaller tile on the stack, where LLVM keeps it in registers). The
accumulators start from the bias and the activation is applied to them
before the one store (the fused epilogue).

Gemm (:func:`gemm_kernel`): a parallel loop over (row of x, block-row), the
kept blocks of the block-row (reduction), and the block's N outputs as one
vector (N lanes: one register when N is the target's width, split or
partial otherwise), accumulated in registers from the bias; the activation
is applied before the one store. The work is ``M * nnz * N`` multiply-adds.
"""

from __future__ import annotations

import dataclasses

from edgec.ops.common import STACK_TILE_BYTES, ConvGeometry, activation_expr
from edgec.targets.vector import CpuVector

__all__ = ["ConvShape", "KernelPlan", "conv_kernel", "even_tiles", "gemm_kernel", "kernel_plan", "padded_copy"]


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


def even_tiles(extent: int, widest: int) -> tuple[int, int, int]:
    """``extent`` positions in tiles of (nearly) equal size, none wider than ``widest``: (tiles,
    base, wide), ``wide`` tiles of ``base + 1`` positions, then tiles of ``base`` (49 -> 17, 16, 16
    rather than 24, 24, 1: no narrow tail tile paying a whole tile's loop overhead)."""
    tiles = -(-extent // widest)
    base, wide = divmod(extent, tiles)
    return tiles, base, wide


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvShape(ConvGeometry):
    """Static shapes of one BlockSparseConv call (NCHW): the geometry and the packed blocks."""

    blocks: int
    block_size: int
    nnz: int

    @property
    def out_channels(self) -> int:
        return self.blocks * self.block_size

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
    row_tiles, base, wide = even_tiles(out_w, plan.positions)
    window = kh * kw
    pad_copy = padded_copy(shape)  # (only used with padding, where images, height, width are the shape's)

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
            pad_copy(xf, xp)
            main_loops(xp, vf, indices, indptr, bias, yf)
        else:
            main_loops(xf, vf, indices, indptr, bias, yf)

    return kernel


def padded_copy(shape: ConvShape, channels_to: int | None = None):
    """The TVMScript macro ``copy(xf, xp)``: the NHWC input ``xf`` of ``shape`` (flat) into ``xp``
    (``shape.batch x padded_height x padded_width x channels_to`` floats), a copy with the pads
    (top, left, bottom, right) of zeros around each image and, when ``channels_to`` is more than
    the input's channels, zero channels after them; its rows in one parallel loop."""
    from tvm.script import tirx as T

    images, height, width, channels = shape.batch, shape.height, shape.width, shape.channels
    stride = channels_to or channels
    top, left, _, _ = shape.pads
    padded_h, padded_w = shape.padded_height, shape.padded_width

    @T.macro
    def copy(xf, xp):
        for row in T.parallel(images * padded_h):
            for col in range(padded_w):
                for c in T.vectorized(channels):
                    xp[(row * padded_w + col) * stride + c] = T.if_then_else(
                        top <= row % padded_h
                        and row % padded_h < top + height
                        and left <= col
                        and col < left + width,
                        xf[((row // padded_h * height + row % padded_h - top) * width + col - left) * channels + c],
                        T.float32(0),
                    )
                if stride > channels:  # (a Python condition: no loop without zero channels)
                    for c in T.vectorized(stride - channels):
                        xp[(row * padded_w + col) * stride + channels + c] = T.float32(0)

    return copy


def gemm_kernel(rows_in: int, features: int, blocks: int, block_size: int, nnz: int, act):
    """The scheduled PrimFunc ``(x, values, indices, indptr, bias, y)``."""
    from tvm.script import tirx as T

    n = block_size
    out_features = blocks * n

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((rows_in, features), "float32"),
        values: T.Buffer((nnz, n), "float32"),
        indices: T.Buffer((nnz,), "int32"),
        indptr: T.Buffer((blocks + 1,), "int32"),
        bias: T.Buffer((out_features,), "float32"),
        y: T.Buffer((rows_in, out_features), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for task in T.parallel(rows_in * blocks):
            acc = T.alloc_buffer((n,), "float32")  # "global" and under 1 KiB: on the stack, in registers
            for j in T.vectorized(n):
                acc[j] = bias[task % blocks * n + j]
            for k in range(indptr[task % blocks], indptr[task % blocks + 1]):
                for j in T.vectorized(n):
                    acc[j] = acc[j] + values[k, j] * x[task // blocks, indices[k]]
            for j in T.vectorized(n):
                y[task // blocks, task % blocks * n + j] = act(acc[j])

    return kernel
