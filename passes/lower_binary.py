"""Lower layers with binary weights to ``edgec.BinaryConv`` / ``edgec.BinaryGemm`` (``-p binary``).

Detection (exact; the default). The weight ``W`` of a Conv ``(C_out, C_in/g,
kh, kw)``, of a Gemm (the rows of ``B^T``, ``(N, K)``) or of a MatMul with a
2-D constant ``B`` (its columns; a following ``Add`` of one constant per
column becomes the bias) is binary per output
channel when every value of channel ``o`` is ``+a_o`` or ``-a_o``
(``encoding=sign``: XNOR-Net, RBNN, ReCU, a graph computing
``sign(W) * mean|W|``), or ``0`` or ``a_o`` (``encoding=magnitude``: SiMaN).
Then ``W = a_o * u`` with ``u`` in ``{-1, +1}`` (or ``{0, 1}``), stored as one
bit per weight plus the float32 ``a_o``; ``scale=per-tensor`` asks for one
``a`` for the whole layer. Decoding reproduces the float32 weights bit for
bit, so the lowered graph computes what the original did (up to float
summation order). Weights computed by a constant subgraph (``Sign``, ``Abs``,
``ReduceMean``, ``Mul`` of an initializer, as the dynamo exporter leaves a
binarised layer) are evaluated first (ONNX reference ops) and die with the
layer.

Quantisation (``quantize=true``; lossy, the deviation is logged per layer
and ``edgec.apply`` reports the output error)::

    sign:       u = +1 if W >= 0 else -1,  a_o = mean_i |W_oi|
                (XNOR-Net: the least-squares a for that u)
    magnitude:  SiMaN's angle alignment, per channel: u = 1 on the k largest
                W_oi, where k maximises (sum of the k largest) / sqrt(k), i.e.
                the cosine between W_o and u; a_o = their mean (least squares)
    per-tensor: one a for the layer: mean |W|, or the mean of all selected W

Binary activations. When the layer's input is binarised in the graph -- ONNX
``Sign(x)`` (values -1, 0, +1), or ``where(x >= 0, 1, -1)`` (as
``Where(GreaterOrEqual(x, 0), 1, -1)`` or ``Where(Less(x, 0), -1, 1)``) --
the op gets ``binarize_input=sign`` / ``sign_ge0`` and runs as xnor/popcount
over bit-packed channels, zero padding exact (see edgec/ops/binary/).
The op reads ``x`` itself when every consumer of the binarising node is
lowered (the node is removed); else it reads the binarised tensor, which it
binarises again to the same values (``b(b(x)) = b(x)``). A Gemm's input may
reach the binarising node through Flatten/Reshape. A grouped convolution
runs weight-only (float activations x decoded weights); so does any layer
when ``binary_activations=false``.

Epilogue. The Conv's bias (a Gemm's ``beta * C``; ``alpha`` goes into the
scale) becomes the op's bias. A BatchNormalization (inference, constant
per-channel statistics) that is the layer's only consumer is folded into the
op: ``scale' = a * s``, ``bias' = b * s + t`` with fold-bn's
``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s`` (float64 math). Then
a Relu, or a Clip with constant bounds, that is the only consumer is fused.
Running ``fold-bn`` first does the same for the batch norm: folded into the
Conv it scales each output channel, which keeps the weight binary per
channel (``+-a * s``).

Weight bytes: float32 ``C_out * C_in/g * kh * kw * 4`` become
``C_out * kh * kw * ceil(C_in/g / 8)`` bits-bytes plus ``4 * C_out`` of scale:
32x less when ``C_in/g`` is a multiple of 8 (logged per layer and in total).

Standard form (``pack=false``): the same layers, decided the same way, keep
their Conv/Gemm/MatMul and the binarising Sign/Where nodes, with the float32
weights the codes stand for (``scale[o] * u``: the quantized weights under
``quantize``, the original ones otherwise). ONNX Runtime runs that graph;
edgec checks every packed build against it (edgec/apply_passes.py keeps it
beside the packed graph), so the check shares no code with the op's
kernels or its NumPy reference.

This module holds the binary math and the pass's options; the lowering
itself is the coded-weight driver shared with ternary (passes/coded_weights.py,
fed this pass's codec; matching and epilogue in passes/weight_layers.py).

Nothing is lowered, and an INFO line names the node and says why, when: the
weight is not a constant, or not float32; it is not binary per channel
(without ``quantize``; the channel and its values are named); the Conv is
not 2-D, or has ``auto_pad=SAME_*`` without a static input shape; a Gemm has
``transA=1`` or a ``C`` that is not one value per output column; a MatMul's
input is not 2-D; the node is in ``exclude``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import numpy as np

from edgec.passes.coded_weights import Codec, CodedWeight, CodedWeightPass, conv_bits, relative_error
from edgec.passes.options import option_help

__all__ = [
    "CodedWeight",
    "LowerBinaryPass",
    "binary_bits",
    "binary_codes",
    "conv_bits",
    "quantize_binary",
    "relative_error",
]


# --------------------------------------------------------------------------
# The math: pure NumPy.
# --------------------------------------------------------------------------


def _values_text(values: np.ndarray, limit: int = 4) -> str:
    shown = ", ".join(f"{float(value):.6g}" for value in values[:limit])
    return shown + (f", ... ({len(values)} distinct)" if len(values) > limit else "")


def binary_codes(weight: np.ndarray, encoding: str = "sign", per_tensor: bool = False) -> CodedWeight:
    """The exact binary form of ``weight`` (output channels on axis 0), or ValueError saying why not.

    ``sign``: every value of channel o is ``+-a_o`` (``a_o = max |W_o|``, codes -1/+1,
    ``-a`` -> -1; an all-zero channel has ``a = 0``). ``magnitude``: every value is
    0 or one nonzero ``a_o`` (codes 0/1). ``per_tensor``: one ``a`` for all channels.
    """
    weight = np.asarray(weight)
    flat = weight.reshape(weight.shape[0], -1)
    if encoding == "sign":
        magnitude = np.abs(flat)
        scale = magnitude.max(axis=1)
        bad = np.nonzero((magnitude != scale[:, None]).any(axis=1))[0]
        if bad.size:
            values = np.unique(flat[bad[0]])
            raise ValueError(f"output channel {bad[0]} takes the values {_values_text(values)}, not +-a")
        codes = np.where(flat < 0, -1, 1).astype(np.int8)
        scales_used = scale
    elif encoding == "magnitude":
        nonzero = flat != 0
        first = nonzero.argmax(axis=1)
        scale = np.where(nonzero.any(axis=1), flat[np.arange(flat.shape[0]), first], 0).astype(flat.dtype)
        bad = np.nonzero((nonzero & (flat != scale[:, None])).any(axis=1))[0]
        if bad.size:
            values = np.unique(flat[bad[0]])
            raise ValueError(f"output channel {bad[0]} takes the values {_values_text(values)}, not 0 and one a")
        codes = nonzero.astype(np.int8)
        scales_used = scale[nonzero.any(axis=1)]
    else:
        raise ValueError(f"unknown encoding {encoding!r}; one of sign, magnitude")
    if per_tensor and np.unique(scales_used).size > 1:
        raise ValueError(f"the channels have {np.unique(scales_used).size} different scales, not one (per-tensor)")
    return CodedWeight(codes.reshape(weight.shape), scale.astype(np.float64))


def quantize_binary(weight: np.ndarray, encoding: str = "sign", per_tensor: bool = False) -> CodedWeight:
    """Binarise float weights (lossy): XNOR-Net for ``sign``, SiMaN's angle alignment for
    ``magnitude`` (see the module docstring); float64 math."""
    weight = np.asarray(weight)
    flat = weight.reshape(weight.shape[0], -1).astype(np.float64)
    if encoding == "sign":
        codes = np.where(flat < 0, -1, 1).astype(np.int8)
        magnitude = np.abs(flat)
        scale = np.full(flat.shape[0], magnitude.mean()) if per_tensor else magnitude.mean(axis=1)
    elif encoding == "magnitude":
        order = np.argsort(-flat, axis=1, kind="stable")
        ranked = np.take_along_axis(flat, order, axis=1)
        cosine = np.cumsum(ranked, axis=1) / np.sqrt(np.arange(1, flat.shape[1] + 1))
        keep = cosine.argmax(axis=1) + 1  # k per channel
        selected = np.arange(flat.shape[1])[None, :] < keep[:, None]
        codes = np.zeros(flat.shape, np.int8)
        np.put_along_axis(codes, order, selected.astype(np.int8), axis=1)
        sums = (ranked * selected).sum(axis=1)
        scale = np.full(flat.shape[0], sums.sum() / keep.sum()) if per_tensor else sums / keep
    else:
        raise ValueError(f"unknown encoding {encoding!r}; one of sign, magnitude")
    return CodedWeight(codes.reshape(weight.shape), scale)


def binary_bits(coded: CodedWeight, encoding: str) -> np.ndarray:
    """The op's bit per weight (uint8 0/1): sign: 1 for -1; magnitude: 1 for 1."""
    return (coded.codes < 0 if encoding == "sign" else coded.codes > 0).astype(np.uint8)


# --------------------------------------------------------------------------
# The pass.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LowerBinaryPass(CodedWeightPass):
    """Lower Conv/Gemm/MatMul with binary weights to 1-bit edgec ops, xnor/popcount on Sign inputs.

    Weights ``+-a`` (or ``{0, a}``) per output channel become edgec.BinaryConv /
    edgec.BinaryGemm; see the module docstring. Options ``scale``, ``exclude``,
    ``pack`` and the driver: passes/coded_weights.py.
    """

    cli_name: ClassVar[str] = "binary"

    quantize: bool = dataclasses.field(
        default=False,
        metadata=option_help("binarise float weights too (lossy: XNOR-Net sign/mean|W|, SiMaN angle alignment)"),
    )
    encoding: Literal["sign", "magnitude"] = dataclasses.field(
        default="sign",
        metadata=option_help("sign: weights +-a (XNOR-Net, RBNN, ReCU); magnitude: weights 0 or a (SiMaN)"),
    )
    binary_activations: bool = dataclasses.field(
        default=True,
        metadata=option_help("run layers whose input is Sign(x) or where(x>=0,1,-1) as xnor/popcount kernels"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoding not in ("sign", "magnitude"):
            raise ValueError(f"encoding must be sign or magnitude, not {self.encoding!r}")

    def reads_binary_activations(self) -> bool:
        return self.binary_activations

    def codec(self) -> Codec:
        """This configuration's row of the codec table: 1 bit per weight, xnor/popcount on binary inputs."""
        per_tensor = self.scale == "per-tensor"
        return Codec(
            kind="binary",
            ops=("BinaryConv", "BinaryGemm"),
            codes=lambda weight: binary_codes(weight, self.encoding, per_tensor),
            quantize=lambda weight: quantize_binary(weight, self.encoding, per_tensor),
            pack=lambda coded: conv_bits(binary_bits(coded, self.encoding)),
            attributes={"encoding": self.encoding},
            label=self.encoding,
            options=f"{self.encoding}, {self.scale}",
            verb="binarises",
            xnor=True,
        )
