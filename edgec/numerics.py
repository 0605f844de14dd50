"""How far apart two sets of outputs are."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def deviation(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> tuple[float, float]:
    """Max absolute error, and max error relative to the reference's largest magnitude."""
    max_abs = 0.0
    max_rel = 0.0
    for got, want in zip(actual, expected, strict=True):
        if got.shape != want.shape:
            return float("inf"), float("inf")
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        scale = max(float(np.max(np.abs(want))), 1e-12) if want.size else 1.0
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float(diff.max()) / scale)
    return max_abs, max_rel
