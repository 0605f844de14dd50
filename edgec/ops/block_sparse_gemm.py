"""``edgec.BlockSparseGemm``: ``y = act(x @ W^T + bias)`` with a 1xN block-sparse ``W``.

``W`` is ``(C_out, K)`` (a Gemm's ``B`` with ``transB=1``, ``alpha`` folded
in), ``C_out = B * N``; blocks are ``N`` consecutive output features at one
input feature, stored as in ``edgec.BlockSparseConv``::

    indptr   int32 (B + 1,)     indices  int32 (nnz,)
    values   float32 (nnz, N)   bias     float32 (C_out,)

    y[m, b*N + j] = act(bias[b*N + j] + sum_{k in row b} values[k, j] * x[m, indices[k]])

``x`` is ``(M, K)``; attributes ``block_size``, ``activation`` (``none``,
``Relu``, ``Clip``), ``activation_min``, ``activation_max``.

Kernel (CPU): a parallel loop over (row of x, block-row), the kept blocks of
the block-row (reduction), and the block's N outputs as one vector (N lanes:
one register when N is the target's width, split or partial otherwise),
accumulated in registers from the bias; the activation is applied before the
one store. The work is
``M * nnz * N`` multiply-adds: it scales with the kept blocks. CUDA decodes
to a dense matmul with a warning.
"""

from __future__ import annotations

import logging

import numpy as np

from edgec.errors import BuildError
from edgec.ops import CustomOp, register
from edgec.ops.block_sparse_conv import (
    BLOCK_ATTRIBUTES,
    biased_activation,
    check_block_size,
    sparse_inputs,
    unpack_blocks,
    warn_narrow_blocks,
)
from edgec.ops.common import ACTIVATION_ATTRIBUTES, Reference, activation_expr, emit_kernel, is_cuda, relax_activation
from edgec.targets.vector import cpu_vector

log = logging.getLogger(__name__)

__all__ = ["BlockSparseGemm", "gemm_kernel"]


class BlockSparseGemm(Reference):
    """NumPy reference: decode the blocks to a dense ``(C_out, K)`` weight, ``x @ W^T + bias``, activate."""

    ATTRIBUTES = BLOCK_ATTRIBUTES | ACTIVATION_ATTRIBUTES

    def compute(self, attrs, x, values, indices, indptr, bias=None):
        check_block_size(attrs, values)
        weight = unpack_blocks(values, indices, indptr, x.shape[1])
        return biased_activation(np.asarray(x, dtype=np.float64) @ weight.astype(np.float64).T, bias, attrs, x.dtype)


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


register(
    CustomOp(
        "BlockSparseGemm",
        BlockSparseGemm,
        lower_block_sparse_gemm,
        "Gemm with a 1xN block-sparse weight (kept blocks only), fused bias and activation",
    )
)
