"""NumPy references of ``edgec.BinaryConv`` and ``edgec.BinaryGemm``.

With ``binarize_input`` one of

    none       b(x) = x                          (weight-only: float activations)
    sign       b(x) = Sign(x) in {-1, 0, +1}     (ONNX Sign: Sign(0) = 0)
    sign_ge0   b(x) = +1 if x >= 0 else -1       (Larq's ste_sign, where(x >= 0, 1, -1))

the ops compute::

    dot[n, o, oh, ow] = sum_{c, i, j} b(x_pad)[n, c, oh*sh + i*dh, ow*sw + j*dw] * u[o, c, i, j]
    y = act(dot * scale[o] + bias[o])          act: none, Relu, Clip(activation_min, activation_max)

(Gemm: ``dot[m, n] = sum_k b(A)[m, k] * u[n, k]``; the pass folds Gemm's
alpha, beta and transB into the scale, the bias and the bit layout.) The
zero padding of a convolution pads ``b(x)`` with 0, not with a +-1 value:
padded taps contribute nothing, exactly as in the float model. The
reference computes ``dot`` in float64 (for binary activations an exact
integer) and ``dot * scale + bias`` in float32, as the kernel does.
"""

from __future__ import annotations

import numpy as np

from edgec.ops.binary.format import ENCODINGS, unit_weights, unpack_bits
from edgec.ops.common import ACTIVATION_ATTRIBUTES, CONV_ATTRIBUTES, Attributes, Reference, apply_activation, conv_reference

__all__ = ["BINARIZATIONS", "CODE_ATTRIBUTES", "BinaryConv", "BinaryGemm", "binarize", "epilogue_reference"]

BINARIZATIONS = ("none", "sign", "sign_ge0")

# the attributes of BinaryConv / BinaryGemm beside the convolution's and the activation's
CODE_ATTRIBUTES = Attributes(
    {"encoding": "sign", "binarize_input": "none"}, {"encoding": ENCODINGS, "binarize_input": BINARIZATIONS}
)


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
        dot = conv_reference(binarize(x, attrs.binarize_input), unit, attrs, "weight bits")
        return epilogue_reference(dot, scale, bias, (1, -1, 1, 1), attrs)


class BinaryGemm(Reference):
    """NumPy reference: ``act(b(A) @ u^T * scale + bias)``, see the module docstring."""

    ATTRIBUTES = CODE_ATTRIBUTES | ACTIVATION_ATTRIBUTES

    def compute(self, attrs, a, weight_bits, scale, bias=None):
        unit = unit_weights(unpack_bits(weight_bits, a.shape[1]), attrs.encoding)  # (N, K)
        dot = binarize(a, attrs.binarize_input) @ unit.T
        return epilogue_reference(dot, scale, bias, (1, -1), attrs)
