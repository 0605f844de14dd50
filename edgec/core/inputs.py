"""Seeded random inputs: the one rule every part of edgec makes test inputs with.

An input is described by its signature (the manifest's form, ``edgec.core.model.value_signature``):
``{"shape": [...], "dtype": "float32", "index_range": [low, high]}`` (``index_range``
optional, on integer inputs a Gather reads as indices, see ``edgec.core.model.index_ranges``).

    float    standard normal
    integer  0 or 1, kept inside ``index_range`` when the input has one (an index
             out of range reads other memory in compiled code, which does not check)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def random_array(shape: Sequence[int], dtype: Any, rng: np.random.Generator, index_range: Sequence[int] | None = None) -> np.ndarray:
    """One array of ``shape`` and ``dtype`` (None: float32) drawn from ``rng`` by the module's rule."""
    dtype = np.dtype(dtype or "float32")
    shape = tuple(int(dim) for dim in shape or ())
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    low, high = index_range if index_range is not None else (0, 1)
    return rng.integers(max(low, 0), min(high, 1) + 1, size=shape).astype(dtype)


def random_inputs(signatures: Sequence[Mapping[str, Any]], seed: int = 0) -> list[np.ndarray]:
    """One array per signature, in order, from one generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    return [random_array(spec["shape"], spec["dtype"], rng, spec.get("index_range")) for spec in signatures]
