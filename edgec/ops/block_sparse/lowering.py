"""Relax lowerings of ``edgec.BlockSparseConv`` and ``edgec.BlockSparseGemm``.

CPU: the kernels of edgec/ops/block_sparse/kernels.py as opaque ``call_tir``,
the packed arrays as their constant arguments. A Conv (any window) whose blocks
are narrower than the CPU's vector (N=4 and N=8 with AVX-512, N=4 with AVX2)
takes the positions-vectorised kernel of positions.py instead (``positions_plan``
says when); NEON's 4 lanes keep the N-vectorised kernel. Both Conv kernels are
channels-last and the ONNX graph NCHW: the lowering wraps it in NCHW -> NHWC
-> NCHW ``permute_dims``. Where the CPU schedule library makes the graph
channels-last, those transposes meet the layout pass's inverse ones and
``edgec.ops.transposes.cancel_transposes`` removes both; without it
(``compile(..., schedules=False)``) they stay, two transposes per op.

CUDA has no sparse kernel here: the weights are decoded to dense and the ops
lower to a dense conv2d / matmul (a warning is logged).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np

from edgec.core.errors import BuildError
from edgec.ops.block_sparse.format import unpack_blocks
from edgec.ops.block_sparse.kernels import ConvShape, conv_kernel, gemm_kernel, kernel_plan
from edgec.ops.block_sparse.positions import positions_kernel, positions_plan
from edgec.ops.block_sparse.reference import BlockSparseConv, BlockSparseGemm
from edgec.ops.common import activation_expr, emit_kernel, float_input, is_cuda, op_inputs, relax_activation
from edgec.targets.vector import cpu_vector

log = logging.getLogger(__name__)

__all__ = ["CONV_ATTR", "SparseConvCall", "lower_block_sparse_conv", "lower_block_sparse_gemm", "warn_narrow_blocks"]

# the PrimFunc attribute that records what a BlockSparseConv kernel computes (SparseConvCall), for
# graph rewrites that replace the kernel (targets/schedules/winograd_sparse.py)
CONV_ATTR = "edgec.block_sparse_conv"

# the packed arrays after the data input, in input order, with their dtypes
SPARSE_WEIGHTS = {"values": np.float32, "indices": np.int32, "indptr": np.int32, "bias": np.float32}


@dataclasses.dataclass(frozen=True)
class SparseConvCall:
    """What one BlockSparseConv kernel computes besides its arrays: the geometry (NCHW, the
    real ``nnz``) and the fused activation. Stored on the kernel's PrimFunc (``CONV_ATTR``)."""

    shape: ConvShape
    activation: str = "none"
    low: float = 0.0
    high: float = 0.0

    def as_attr(self) -> dict:
        return {**dataclasses.asdict(self.shape), "activation": self.activation, "low": self.low, "high": self.high}

    @classmethod
    def of_kernel(cls, prim) -> SparseConvCall | None:
        """The record on ``prim`` (a PrimFunc), None when it is not a BlockSparseConv kernel."""
        record = prim.attrs.get(CONV_ATTR) if prim.attrs is not None else None
        if record is None:
            return None
        fields = {key: _plain(value) for key, value in record.items()}
        activation, low, high = fields.pop("activation"), fields.pop("low"), fields.pop("high")
        return cls(ConvShape(**fields), activation, low, high)


def _plain(value):
    """A TVM attribute value (int, float, String, IntImm, FloatImm, Array of them) as Python's."""
    if isinstance(value, (bool, int, float, str)):
        return type(value)(value) if not isinstance(value, str) else str(value)
    if hasattr(value, "dtype"):
        return float(value.value) if "float" in str(value.dtype) else int(value.value)
    return tuple(_plain(item) for item in value)


def sparse_inputs(op: str, inputs, layout: str):
    """(data, its shape, values, indices, indptr, bias) of a BlockSparseConv/Gemm call."""
    data, weights = op_inputs(op, inputs, "x", SPARSE_WEIGHTS)
    return data, float_input(op, data, layout), *weights.values()


def warn_narrow_blocks(target, block_size: int, lanes: int) -> None:
    """Warn, once per (target, N), when a block's N channels fill less than a vector."""
    if block_size < lanes:
        _warn_narrow_blocks(getattr(target, "spec", "this machine"), block_size, lanes)


@functools.cache
def _warn_narrow_blocks(target: str, block_size: int, lanes: int) -> None:
    log.warning(
        "block-sparse N=%d on %s: the kernels of Gemm layers (and of conv layers when N is not a "
        "multiple of 4) vectorise over a block's N output channels and fill %d of the CPU's %d float "
        "lanes, so they can run slower than dense (README: block-sparse timings); prune with n=%d for "
        "this target",
        block_size, target, block_size, lanes, lanes,
    )  # fmt: skip


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
    kernel_shape = shape
    if shape.nnz == 0:  # every block pruned (the output is the bias): TIR takes no 0-sized buffer
        values, indices = np.zeros((1, *values.shape[1:]), np.float32), np.zeros(1, np.int32)
        kernel_shape = dataclasses.replace(shape, nnz=1)
    positions = positions_plan(shape, vector)
    if positions is not None:  # blocks narrower than the vector: vectorise over positions instead
        prim = positions_kernel(kernel_shape, positions, activation, low, high)
    else:
        warn_narrow_blocks(target, block_size, vector.lanes)
        extent = shape.batch * shape.height * shape.width if shape.pointwise else shape.out_width
        prim = conv_kernel(kernel_shape, kernel_plan(block_size, extent, vector), activation, low, high)
    prim = prim.with_attr("edgec.flops", 2.0 * shape.multiply_adds)
    prim = prim.with_attr(CONV_ATTR, SparseConvCall(shape, activation, low, high).as_attr())
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


def lower_block_sparse_gemm(bb, inputs, attrs, target):
    """Emit the kernel as an opaque call_tir (CPU) or a dense matmul (CUDA)."""
    from tvm import relax

    x, x_shape, values, indices, indptr, bias = sparse_inputs("BlockSparseGemm", inputs, "(M, K)")
    attrs = BlockSparseGemm.ATTRIBUTES.read("BlockSparseGemm", attrs, BuildError)
    activation, low, high = attrs.activation, attrs.activation_min, attrs.activation_max
    rows_in, features = x_shape
    block_size, blocks, nnz = values.shape[1], indptr.size - 1, indices.size
    out_shape = [rows_in, blocks * block_size]
    if is_cuda(target):
        log.warning(
            "BlockSparseGemm (%d of %d blocks kept) on %s: no sparse GPU kernel, decoded to a dense matmul",
            nnz, blocks * features, target.spec,
        )  # fmt: skip
        weight = unpack_blocks(values, indices, indptr, features)
        y = relax.op.add(relax.op.matmul(x, relax.const(np.ascontiguousarray(weight.T))), relax.const(bias))
        return relax_activation(y, activation, low, high)
    warn_narrow_blocks(target, block_size, cpu_vector(target).lanes)
    if nnz == 0:  # every block pruned (the output is the bias): TIR takes no 0-sized buffer
        values, indices = np.zeros((1, block_size), np.float32), np.zeros(1, np.int32)
    prim = gemm_kernel(rows_in, features, blocks, block_size, max(nnz, 1), activation_expr(activation, low, high))
    prim = prim.with_attr("edgec.flops", 2.0 * rows_in * nnz * block_size)
    args = [x, relax.const(values), relax.const(indices), relax.const(indptr), relax.const(bias)]
    return emit_kernel(bb, prim, "edgec_block_sparse_gemm", args, relax.TensorType(out_shape, "float32"))
