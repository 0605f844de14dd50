"""NumPy references of ``edgec.TernaryConv`` and ``edgec.TernaryGemm``.

The ops compute (float activations; NCHW for the Conv)::

    y = act(conv(x, t) * scale[o] + bias[o])        /   act(A @ t^T * scale + bias)

with ``act`` one of none, Relu, Clip(activation_min, activation_max). The
reference convolves in float64 and applies scale and bias in float32 (binary's
epilogue).
"""

from __future__ import annotations

import numpy as np

from edgec.ops.binary.reference import epilogue_reference
from edgec.ops.common import ACTIVATION_ATTRIBUTES, CONV_ATTRIBUTES, Reference, conv_reference
from edgec.ops.ternary.format import ternary_weights

__all__ = ["TernaryConv", "TernaryGemm"]


class TernaryConv(Reference):
    """NumPy reference: ``act(conv(x, t) * scale + bias)``, see the module docstring."""

    ATTRIBUTES = CONV_ATTRIBUTES | ACTIVATION_ATTRIBUTES

    def compute(self, attrs, x, weight_bits, scale, bias=None):
        unit = np.moveaxis(ternary_weights(weight_bits, x.shape[1] // attrs.group), 3, 1)  # (O, C/g, kh, kw)
        dot = conv_reference(x, unit, attrs, "weight bits")
        return epilogue_reference(dot, scale, bias, (1, -1, 1, 1), attrs)


class TernaryGemm(Reference):
    """NumPy reference: ``act(A @ t^T * scale + bias)``."""

    ATTRIBUTES = ACTIVATION_ATTRIBUTES

    def compute(self, attrs, a, weight_bits, scale, bias=None):
        dot = np.asarray(a, np.float64) @ ternary_weights(weight_bits, a.shape[1]).T
        return epilogue_reference(dot, scale, bias, (1, -1), attrs)
