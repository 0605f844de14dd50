"""How far apart two sets of outputs are, and whether they agree as float32 results should.

One rule, used by ``edgec compile``'s verification and by ``edgec bench``'s
check on the device. For each output tensor, with ``want`` the reference::

    scale   = max |want|                       (finite values; 0 for an empty tensor)
    allowed = atol + rtol * scale
    agree   <=>  |got - want| <= allowed for every element
                 (NaN only where the reference has NaN, +-inf only where it has the same inf)

Why the tensor's scale and not ``|want|`` element by element: float32
rounding error of a sum grows with the magnitude of its terms, not with its
result. An output element near zero that came out of terms of size 10^3
carries an error of about 10^3 * 2^-24 * sqrt(terms), which an element-wise
``atol + rtol * |want|`` (numpy.allclose) refuses although the build is
right. A wrong kernel is still caught: its errors are of the order of the
values it computes, far above ``rtol`` (1e-4) of the tensor's scale.
What the rule cannot see: an error confined to elements many orders of
magnitude below the tensor's largest one.

int8 (QDQ) graphs. A quantized graph rounds every activation to a grid of
256 values; a float32 summation order that differs by one ulp moves a value
that lies on a rounding boundary to the neighbouring code, and that one-step
difference travels to the output. There the rule's ``atol`` becomes a number
of quantization steps of the output, ``quantization_step``: one step of a
uint8 grid spanning the reference output's range, ``(max - min) / 255``,
or, when larger, the spread between two correct implementations of the same
QDQ graph, ONNX Runtime as written and ONNX Runtime's fused integer kernels
(``int8_tolerance``): in a deep network one flipped code early on moves the
output by many steps (full-size random-weight MobileNetV2: the two ORT
runs differ by 7 to 12 steps), and no output check can tell a build apart
from a correct one when it lies within what correct implementations already
differ by. That spread is itself noisy from input to input, so compile
measures it on ``INT8_INPUTS`` seeded inputs, records the largest (in output
steps) in the manifest, and allows ``INT8_NOISE_FACTOR`` times it on every
input (``edgec bench`` too, on its own input). On a graph where the two ORT
runs agree the allowance stays one step, and a wrong scale or zero point is
refused.
Float graphs keep the float32 rule above unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Agreement:
    """The verdict of :func:`compare`: ``ok``, the largest errors, and in ``detail`` the element
    that breaks the rule the most (or the closest call when all agree)."""

    ok: bool
    max_abs: float
    max_rel: float  # max |got - want| / max |want|, per tensor, the largest over tensors
    detail: str

    def as_dict(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "within_tolerance": self.ok, "detail": self.detail}


def compare(
    got: Sequence[np.ndarray],
    want: Sequence[np.ndarray],
    *,
    rtol: float,
    atol: float,
    names: Sequence[str] | None = None,
) -> Agreement:
    """Whether ``got`` agrees with ``want`` under the module's rule; the detail names the element."""
    names = list(names) if names is not None else [f"#{index}" for index in range(len(want))]
    if len(got) != len(want):
        return Agreement(False, float("inf"), float("inf"), f"{len(got)} outputs, the reference has {len(want)}")
    max_abs = max_rel = 0.0
    worst: tuple[float, str] | None = None  # (error / allowed, sentence) of the worst element so far
    for name, actual, reference in zip(names, got, want, strict=True):
        actual, reference = np.asarray(actual), np.asarray(reference)
        if actual.shape != reference.shape:
            return Agreement(
                False, float("inf"), float("inf"), f"output '{name}' has shape {actual.shape}, the reference {reference.shape}"
            )
        if reference.size == 0:
            continue
        a = actual.astype(np.float64)
        b = reference.astype(np.float64)
        finite = np.isfinite(b)
        scale = float(np.max(np.abs(b[finite]))) if finite.any() else 0.0
        allowed = atol + rtol * scale
        same_special = (np.isnan(a) & np.isnan(b)) | (np.isinf(b) & (a == b))
        error = np.where(same_special, 0.0, np.abs(a - b))
        error = np.where(np.isnan(error), np.inf, error)  # NaN where the reference is a number
        index = np.unravel_index(int(np.argmax(error)), error.shape)
        largest = float(error[index])
        max_abs = max(max_abs, largest)
        max_rel = max(max_rel, largest / scale if scale > 0 else (0.0 if largest == 0 else float("inf")))
        ratio = largest / allowed if allowed > 0 else (0.0 if largest == 0 else float("inf"))
        if worst is None or ratio > worst[0]:
            where = ", ".join(str(int(i)) for i in index)
            sentence = (
                f"output '{name}' element [{where}]: got {a[index]:.6g}, want {b[index]:.6g}, |error| {largest:.3g} "
                f"{'>' if ratio > 1 else '<='} {allowed:.3g} allowed (atol {atol:g} + rtol {rtol:g} x {scale:.4g}, "
                "the output's largest |value|: float32 rounding grows with it)"
            )
            worst = (ratio, sentence)
    ok = worst is None or worst[0] <= 1.0
    return Agreement(ok, max_abs, max_rel, worst[1] if worst else "no output elements")


UINT8_LEVELS = 255  # steps of a uint8 grid


def quantization_step(want: Sequence[np.ndarray]) -> float:
    """One step of a uint8 grid over an output's range, ``(max - min) / 255``, the largest over the outputs."""
    steps = [0.0]
    for reference in want:
        values = np.asarray(reference, np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            steps.append(float(values.max() - values.min()) / UINT8_LEVELS)
    return max(steps)


INT8_INPUTS = 4  # seeded inputs compile checks an int8 build on (the noise below is their largest)
INT8_NOISE_FACTOR = 1.5  # allowed: this many times the noise of correct implementations


def int8_spread(as_written: Sequence[np.ndarray], fused: Sequence[np.ndarray] | None) -> float:
    """The largest ``|fused - as_written|`` (0 without ``fused``): how far two correct implementations
    of a QDQ graph (ONNX Runtime's fused integer kernels, the graph as written) are apart."""
    spread = 0.0
    if fused is not None:
        for a, b in zip(fused, as_written, strict=True):
            if np.asarray(b).size:
                spread = max(spread, float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))))
    return spread


def int8_tolerance(
    as_written: Sequence[np.ndarray], fused: Sequence[np.ndarray] | None, steps: float, noise_steps: float = 0.0
) -> tuple[float, float, float]:
    """(allowed absolute error, output step, spread) for an int8 build checked against ``as_written``:
    ``max(steps x step, INT8_NOISE_FACTOR x max(spread, noise_steps x step))``, ``step`` the output's
    ``quantization_step``, ``spread`` ``int8_spread`` on these outputs and ``noise_steps`` the largest
    spread, in output steps, over the inputs compile checked (``INT8_INPUTS``). One input's spread
    alone refused correct builds: their own distance from the graph as written is of the size of
    ORT's fused kernels' and exceeded it on up to 21 of 50 inputs (bench/int8_agreement.py, README)."""
    step = quantization_step(as_written)
    spread = int8_spread(as_written, fused)
    return max(steps * step, INT8_NOISE_FACTOR * max(spread, noise_steps * step)), step, spread
