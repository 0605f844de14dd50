"""The ternary weight format.

The weight of output channel ``o`` is ``scale[o] * t`` with ``t`` in
``{-1, 0, +1}`` (PTQ pruning ternary quantization, TWN: ``{-a, 0, +a}``),
stored as two bit planes, each packed as binary weights are
(edgec/ops/binary/format.py: little-endian along the input channels, 8 to a
byte)::

    TernaryConv  weight_bits  uint8 (2, C_out, kh, kw, ceil(C_in / group / 8))
    TernaryGemm  weight_bits  uint8 (2, N, ceil(K / 8))
                 plane 0: t != 0        plane 1: t < 0
    both         scale        float32 (C_out,) / (N,);  bias float32, optional

so a float32 weight takes 16x less room (plus one scale per channel).
"""

from __future__ import annotations

import numpy as np

from edgec.ops.binary.format import WeightCode, unpack_bits

__all__ = ["TERNARY", "ternary_weights"]

# t = nonzero * (1 - 2 * negative)
TERNARY = WeightCode("ternary", 2, lambda bits: bits[0] * (1.0 - 2.0 * bits[1]))


def ternary_weights(weight_bits: np.ndarray, count: int) -> np.ndarray:
    """``(2, O, ..., ceil(count/8))`` bit planes -> ``t`` float64 ``(O, ..., count)`` in {-1, 0, +1}."""
    planes = unpack_bits(weight_bits, count).astype(np.float64)
    if planes.shape[0] != TERNARY.planes:
        raise ValueError(f"ternary weight bits need 2 planes (nonzero, negative), got {planes.shape[0]}")
    return TERNARY.unit(planes)
