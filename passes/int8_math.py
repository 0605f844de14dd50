"""The arithmetic of int8 post-training quantization (pure NumPy; the pass is passes/quantize_int8.py).

Weights: symmetric int8 per output channel (zero point 0, codes in [-127, 127]
so that the negation of a code is a code)::

    scale_c = max_i |W_ci| / 127          (1.0 for an all-zero channel)
    q_ci    = clip(round_half_even(W_ci / scale_c), -127, 127)

Activations: asymmetric uint8 per tensor (what x86 VNNI's ``vpdpbusd``
multiplies: unsigned 8-bit activations by signed 8-bit weights; ONNX Runtime's
own default)::

    lo, hi  = the calibrated range, widened to hold 0 (zero must be exact: padding, ReLU)
    scale   = (hi - lo) / 255             (1.0 when hi == lo == 0)
    zp      = clip(round(-lo / scale), 0, 255)

Bias: int32 with scale ``scale_x * scale_w[c]`` and zero point 0 (ONNX
Runtime's QDQ convention; an integer kernel adds it to its int32 sum exactly).

Calibration ranges from the activations a float model computes on the user's
data, per tensor:

- ``minmax``: the smallest and largest value seen;
- ``percentile``: the ``p``-th and ``(100 - p)``-th percentiles (from a
  histogram of ``HISTOGRAM_BINS`` bins over ``[-max|x|, max|x|]``; exact
  zeros are left out of the histograms: any range represents 0 exactly,
  and ReLU outputs, half zeros, would otherwise pull the range in);
- ``entropy``: TensorRT's KL calibration: the threshold ``t`` on ``|x|``
  (histogram of ``HISTOGRAM_BINS / 2`` bins over ``[0, max|x|]``) whose
  clipped distribution ``P`` (outliers added to the last bin) loses the least
  information when merged into ``ENTROPY_LEVELS`` levels ``Q``: argmin
  ``KL(P || Q)``; the range is the min/max range clipped to ``[-t, t]``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "ActivationQuant",
    "HISTOGRAM_BINS",
    "Histogram",
    "activation_quant",
    "entropy_threshold",
    "percentile_range",
    "quantize_bias",
    "quantize_weight",
]

HISTOGRAM_BINS = 4096  # over [-max|x|, max|x|]: 2048 per sign, TensorRT's count for |x|
ENTROPY_LEVELS = 128  # TensorRT's and ONNX Runtime's number of quantized bins for KL calibration
SMOOTHING = 1e-4  # TensorRT's epsilon for Q's empty bins where P has mass
WEIGHT_MAX = 127


def quantize_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along ``axis``: ``(codes int8, scale float32 (C,))`` with
    ``weight ~= codes * scale`` broadcast along ``axis``."""
    weight = np.asarray(weight, dtype=np.float32)
    moved = np.moveaxis(weight, axis, 0)
    largest = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1) if moved.size else np.zeros(moved.shape[0])
    scale = np.where(largest > 0, largest / WEIGHT_MAX, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    codes = np.clip(np.rint(weight / scale.reshape(shape)), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)
    return codes, scale


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias codes and their scale ``input_scale * weight_scale`` (zero point 0)."""
    scale = (np.float32(input_scale) * np.asarray(weight_scale, np.float32)).astype(np.float32)
    codes = np.rint(np.asarray(bias, np.float64) / scale.astype(np.float64))
    limit = np.iinfo(np.int32).max
    return np.clip(codes, -limit, limit).astype(np.int32), scale


@dataclasses.dataclass(frozen=True)
class ActivationQuant:
    """One activation tensor's uint8 parameters: ``x ~= (q - zero_point) * scale``."""

    scale: float
    zero_point: int

    @property
    def low(self) -> float:
        return (0 - self.zero_point) * self.scale

    @property
    def high(self) -> float:
        return (255 - self.zero_point) * self.scale


def activation_quant(low: float, high: float) -> ActivationQuant:
    """uint8 asymmetric parameters for the range ``[low, high]`` (widened to hold 0)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if high == low:
        return ActivationQuant(1.0, 0)
    scale = float(np.float32((high - low) / 255.0))
    zero_point = int(np.clip(np.rint(-low / scale), 0, 255))
    return ActivationQuant(scale, zero_point)


@dataclasses.dataclass
class Histogram:
    """A tensor's value counts over ``[-bound, bound]`` in ``HISTOGRAM_BINS`` bins, with the
    extremes seen; filled batch by batch once ``bound`` (the largest |x|) is known."""

    bound: float
    low: float = np.inf
    high: float = -np.inf
    counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, np.int64))

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float32).ravel()
        if values.size == 0:
            return
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
        values = values[values != 0]  # exact zeros (ReLU's half of the data) are exact at any range
        if self.bound > 0 and values.size:
            counts, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=(-self.bound, self.bound))
            self.counts += counts

    @property
    def width(self) -> float:
        return 2 * self.bound / HISTOGRAM_BINS


def percentile_range(histogram: Histogram, percentile: float) -> tuple[float, float]:
    """``(100 - percentile, percentile)`` percentiles of the histogram (bin edges), inside the extremes."""
    total = histogram.counts.sum()
    if total == 0 or histogram.bound == 0:
        return histogram.low, histogram.high
    cumulative = np.cumsum(histogram.counts) / total
    tail = (100.0 - percentile) / 100.0
    low_bin = int(np.searchsorted(cumulative, tail, side="left"))
    high_bin = int(np.searchsorted(cumulative, 1.0 - tail, side="left"))
    low = -histogram.bound + low_bin * histogram.width
    high = -histogram.bound + (high_bin + 1) * histogram.width
    return max(low, histogram.low), min(high, histogram.high)


def entropy_threshold(absolute_counts: np.ndarray, width: float, levels: int = ENTROPY_LEVELS) -> float:
    """TensorRT's KL threshold on ``|x|`` for the counts of ``|x|`` in bins of ``width`` (see the module docstring)."""
    counts = np.asarray(absolute_counts, np.float64)
    bins = len(counts)
    if counts.sum() == 0 or bins <= levels:
        return bins * width
    best_bins, best_divergence = bins, np.inf
    for kept in range(levels, bins + 1):
        reference = counts[:kept].copy()
        reference[-1] += counts[kept:].sum()  # outliers clipped into the last bin
        # Q: the kept bins merged into `levels` groups, each group's mass spread over its nonzero bins
        group = (np.arange(kept) * levels) // kept
        nonzero = counts[:kept] > 0
        group_mass = np.bincount(group, weights=counts[:kept], minlength=levels)
        group_size = np.bincount(group, weights=nonzero, minlength=levels)
        candidate = np.where(nonzero, group_mass[group] / np.maximum(group_size[group], 1), 0.0)
        p = reference / reference.sum()
        q_total = candidate.sum()
        if q_total == 0:
            continue
        q = candidate / q_total
        support = p > 0
        q = np.where(support & (q == 0), SMOOTHING, q)  # the clipped last bin: P has mass where Q has none
        divergence = float(np.sum(p[support] * np.log(p[support] / q[support])))
        if divergence < best_divergence:
            best_bins, best_divergence = kept, divergence
    return (best_bins + 0.5) * width if best_bins < bins else bins * width


def entropy_range(histogram: Histogram) -> tuple[float, float]:
    """The min/max range clipped to ``[-t, t]``, ``t`` the KL threshold on ``|x|``."""
    if histogram.bound == 0:
        return histogram.low, histogram.high
    half = HISTOGRAM_BINS // 2
    absolute = histogram.counts[half:] + histogram.counts[:half][::-1]  # |x|: bin k of each sign
    threshold = entropy_threshold(absolute, histogram.width)
    return max(histogram.low, -threshold), min(histogram.high, threshold)
