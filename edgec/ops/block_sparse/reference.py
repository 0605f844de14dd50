"""NumPy references of ``edgec.BlockSparseConv`` and ``edgec.BlockSparseGemm``.

The ops compute (Conv: NCHW, group 1)::

    y[n, b*N + j, oh, ow] = act(bias[b*N + j] + sum_{k in row b} sum_{kh, kw}
                                values[k, j, kh, kw] * x_pad[n, indices[k], oh*sh + kh*dh, ow*sw + kw*dw])
    y[m, b*N + j] = act(bias[b*N + j] + sum_{k in row b} values[k, j] * x[m, indices[k]])

with ``act`` one of ``none``, ``Relu`` (``max(y, 0)``) and ``Clip``
(``min(max(y, activation_min), activation_max)``). Attributes: ``block_size``
(N), the activation's, and for the Conv ``kernel_shape``, ``strides``,
``pads`` (ONNX order: top, left, bottom, right), ``dilations``. The
references decode the blocks to a dense weight and compute in float64.
"""

from __future__ import annotations

import numpy as np

from edgec.ops.block_sparse.format import unpack_blocks
from edgec.ops.common import ACTIVATION_ATTRIBUTES, CONV_ATTRIBUTES, Attributes, Reference, apply_activation, conv_reference

__all__ = ["BLOCK_ATTRIBUTES", "BlockSparseConv", "BlockSparseGemm"]

BLOCK_ATTRIBUTES = Attributes({"block_size": None})


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
        y = conv_reference(x, weight, attrs, "blocks")
        return biased_activation(y, bias, attrs, x.dtype)


class BlockSparseGemm(Reference):
    """NumPy reference: decode the blocks to a dense ``(C_out, K)`` weight, ``x @ W^T + bias``, activate."""

    ATTRIBUTES = BLOCK_ATTRIBUTES | ACTIVATION_ATTRIBUTES

    def compute(self, attrs, x, values, indices, indptr, bias=None):
        check_block_size(attrs, values)
        weight = unpack_blocks(values, indices, indptr, x.shape[1])
        return biased_activation(np.asarray(x, dtype=np.float64) @ weight.astype(np.float64).T, bias, attrs, x.dtype)
