"""Lower layers with ternary weights to ``edgec.TernaryConv`` / ``edgec.TernaryGemm`` (``-p ternary``).

Detection (exact; the default). The weight ``W`` of a Conv ``(C_out, C_in/g,
kh, kw)`` or a Gemm (rows of ``B^T``, ``(N, K)``) is ternary per output
channel when the nonzero values of channel ``o`` are ``+a_o`` and ``-a_o``
only (PTQ pruning ternary quantization, TWN: ``{-a, 0, +a}``; a binary
``+-a`` weight is ternary too). Then ``W = a_o * t`` with ``t`` in
``{-1, 0, +1}``, stored as two bit planes (nonzero, negative) plus the
float32 ``a_o``; decoding reproduces the float32 weights bit for bit.
``scale=per-tensor`` asks for one ``a`` for the layer.

Quantisation (``quantize=true``; lossy, TWN's threshold rule, float64)::

    delta_o = delta * mean_i |W_oi|                 (delta = 0.7: TWN's 0.7 E|W|)
    t_oi    = sign(W_oi) if |W_oi| > delta_o else 0
    a_o     = mean of |W_oi| over |W_oi| > delta_o   (least squares for that t; 0 if none)
    per-tensor: delta and a over the whole layer

The layers run weight-only (float activations): the packed planes are
decoded at run time into float32 and convolved by the float kernels (see
edgec/ops/ternary/). The epilogue is binary's (passes/weight_layers.py): the
bias (Gemm's ``beta * C``, ``alpha`` into the scale), a following inference
BatchNormalization folded into scale and bias, then a Relu or Clip fused.
A batch norm folded into the Conv by ``fold-bn`` first scales each channel
and keeps it ternary.

Weight bytes: float32 ``C_out * C_in/g * kh * kw * 4`` become
``2 * C_out * kh * kw * ceil(C_in/g / 8)`` plus ``4 * C_out`` of scale: 16x
less when ``C_in/g`` is a multiple of 8 (logged per layer and in total).

Standard form (``pack=false``): the same layers keep their Conv/Gemm/MatMul
with the dequantized float32 weights ``a_o * t``, which ONNX Runtime runs
as the independent reference of every packed build (see
passes/lower_binary.py).

Nothing is lowered, and an INFO line names the node and says why, for the
reasons listed in passes/lower_binary.py (not constant, not float32, not
ternary per channel without ``quantize``, not 2-D, auto_pad without static
shapes, Gemm transA or a C not per column, excluded).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from edgec.passes.coded_weights import Codec, CodedWeight, CodedWeightPass, conv_bits
from edgec.passes.options import option_help

__all__ = ["LowerTernaryPass", "quantize_ternary", "ternary_codes", "ternary_planes"]


# --------------------------------------------------------------------------
# The math: pure NumPy.
# --------------------------------------------------------------------------


def ternary_codes(weight: np.ndarray, per_tensor: bool = False) -> CodedWeight:
    """The exact ternary form of ``weight`` (output channels on axis 0), or ValueError saying why not.

    Channel o is ternary when its nonzero values have one magnitude ``a_o``
    (codes ``sign(W)``; an all-zero channel has ``a = 0``).
    """
    weight = np.asarray(weight)
    flat = weight.reshape(weight.shape[0], -1)
    magnitude = np.abs(flat)
    scale = magnitude.max(axis=1)
    bad = np.nonzero(((magnitude != 0) & (magnitude != scale[:, None])).any(axis=1))[0]
    if bad.size:
        values = np.unique(magnitude[bad[0]][magnitude[bad[0]] != 0])
        shown = ", ".join(f"{float(value):.6g}" for value in values[:4])
        more = f", ... ({len(values)} distinct)" if len(values) > 4 else ""
        raise ValueError(f"output channel {bad[0]} has nonzero magnitudes {shown}{more}, not one a")
    used = scale[scale != 0]
    if per_tensor and np.unique(used).size > 1:
        raise ValueError(f"the channels have {np.unique(used).size} different scales, not one (per-tensor)")
    codes = np.sign(flat).astype(np.int8)
    return CodedWeight(codes.reshape(weight.shape), scale.astype(np.float64))


def quantize_ternary(weight: np.ndarray, delta: float = 0.7, per_tensor: bool = False) -> CodedWeight:
    """TWN ternarisation (lossy), see the module docstring."""
    weight = np.asarray(weight)
    flat = weight.reshape(weight.shape[0], -1).astype(np.float64)
    magnitude = np.abs(flat)
    if per_tensor:
        threshold = np.full((flat.shape[0], 1), delta * magnitude.mean())
    else:
        threshold = delta * magnitude.mean(axis=1, keepdims=True)
    kept = magnitude > threshold
    codes = (np.sign(flat) * kept).astype(np.int8)
    if per_tensor:
        scale = np.full(flat.shape[0], magnitude[kept].sum() / max(int(kept.sum()), 1))
    else:
        scale = (magnitude * kept).sum(axis=1) / np.maximum(kept.sum(axis=1), 1)
    return CodedWeight(codes.reshape(weight.shape), scale)


def ternary_planes(coded: CodedWeight) -> np.ndarray:
    """The ops' packed planes: ``(2, *conv_bits shape)`` uint8, plane 0 = nonzero, plane 1 = negative."""
    return np.stack([conv_bits(coded.codes != 0), conv_bits(coded.codes < 0)])


# --------------------------------------------------------------------------
# The pass.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LowerTernaryPass(CodedWeightPass):
    """Lower Conv/Gemm/MatMul with ternary weights to 2-bit edgec ops (weight-only).

    Weights ``{-a, 0, +a}`` per output channel become edgec.TernaryConv /
    edgec.TernaryGemm, decoded at run time; see the module docstring. Options
    ``scale``, ``exclude``, ``pack`` and the driver: passes/coded_weights.py.
    """

    cli_name: ClassVar[str] = "ternary"

    quantize: bool = dataclasses.field(
        default=False, metadata=option_help("ternarise float weights too (lossy, TWN threshold rule)")
    )
    delta: float = dataclasses.field(
        default=0.7, metadata=option_help("quantize: weights with |W| <= delta * mean|W| become 0 (TWN: 0.7)")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.delta >= 0:
            raise ValueError(f"delta must be >= 0, not {self.delta!r}")

    def codec(self) -> Codec:
        """This configuration's row of the codec table: 2 bit planes per weight, weight-only."""
        per_tensor = self.scale == "per-tensor"
        return Codec(
            kind="ternary",
            ops=("TernaryConv", "TernaryGemm"),
            codes=lambda weight: ternary_codes(weight, per_tensor),
            quantize=lambda weight: quantize_ternary(weight, self.delta, per_tensor),
            pack=ternary_planes,
            attributes={},
            label=None,
            options=self.scale,
            verb="ternarises",
            count_zeros=True,
        )
