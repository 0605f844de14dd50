"""Coded-weight lowering: one driver for every codec (binary, ternary).

A codec says how a float weight (output channels first) becomes
``W = scale[o] * codes[o, ...]`` exactly (or ValueError saying why not), how
it is quantised when asked (lossy), and how the codes are packed for its
edgec ops. The driver does the rest, the same for every codec: for each
Conv / Gemm / MatMul with a constant weight (passes/weight_layers.py) not in
``exclude``, find the codes; with ``pack=false`` give the layer the float32
weights they stand for (the standard-ONNX twin ONNX Runtime checks packed
builds against); else replace the layer with the codec's op, its packed
codes and float32 scale (Gemm's alpha and a following BatchNormalization
folded in), fuse a following Relu/Clip, and, for codecs that run binary
activations, read a binarised input directly. Each layer's reason, bytes
and quantisation error are logged at INFO.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Literal

import numpy as np
import onnx_ir as ir

from edgec.ops.binary.format import pack_bits
from edgec.passes.graph_edit import describe
from edgec.passes.options import option_help, require_float_graph, require_node_names
from edgec.passes.weight_layers import LAYER_OPS, Skip, WeightRewriter

logger = logging.getLogger(__name__)

__all__ = ["Codec", "CodedWeight", "CodedWeightPass", "conv_bits", "lower_coded_layers", "relative_error"]


@dataclasses.dataclass(frozen=True)
class CodedWeight:
    """``W = scale[o] * codes[o, ...]``: ``codes`` int8 of W's shape, ``scale`` float64 ``(C_out,)``."""

    codes: np.ndarray
    scale: np.ndarray

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """The weight the codes stand for, computed as the op computes it (float32 scale x code)."""
        shape = (-1,) + (1,) * (self.codes.ndim - 1)
        return (self.scale.astype(np.float32).reshape(shape) * self.codes.astype(np.float32)).astype(dtype)


def conv_bits(bits: np.ndarray) -> np.ndarray:
    """Per-weight bits in W's layout -> the ops' packed layout: ``(O, C, kh, kw)`` ->
    ``(O, kh, kw, ceil(C/8))`` uint8; a Gemm's ``(N, K)`` -> ``(N, ceil(K/8))``."""
    bits = np.asarray(bits)
    return pack_bits(np.moveaxis(bits, 1, -1) if bits.ndim == 4 else bits)


def relative_error(weight: np.ndarray, approximation: np.ndarray) -> float:
    """``||W - W_q|| / ||W||`` (0 for a zero weight)."""
    weight = np.asarray(weight, np.float64)
    norm = np.linalg.norm(weight)
    return float(np.linalg.norm(weight - np.asarray(approximation, np.float64)) / norm) if norm else 0.0


@dataclasses.dataclass(frozen=True)
class Codec:
    """One kind of coded weight, as the driver needs it (a row of the codec table).

    ``kind``: the word in log lines ("binary"); ``ops``: the (Conv, Gemm) edgec
    op types; ``codes``: the exact codes of a weight, ValueError when it has
    none; ``quantize``: lossy codes; ``pack``: the op's ``weight_bits`` array;
    ``attributes``: fixed attributes of the op; ``label``: what the per-layer
    line says first (the encoding), if anything; ``options``: the options named
    when a weight is not coded; ``verb``: what ``quantize=true`` does
    ("binarises"); ``xnor``: the op can binarise its input (``binarize_input``);
    ``count_zeros``: the quantisation note gives the share of zero codes.
    """

    kind: str
    ops: tuple[str, str]
    codes: Callable[[np.ndarray], CodedWeight]
    quantize: Callable[[np.ndarray], CodedWeight]
    pack: Callable[[CodedWeight], np.ndarray]
    attributes: dict[str, object]
    label: str | None
    options: str
    verb: str
    xnor: bool = False
    count_zeros: bool = False

    def coded(self, weight: np.ndarray, quantize: bool) -> tuple[CodedWeight, str]:
        """The weight's codes and a note for the log, or Skip saying why it is not coded."""
        try:
            coded = self.codes(weight)
        except ValueError as reason:
            if not quantize:
                raise Skip(f"its weight is not {self.kind} ({self.options}): {reason}; "
                           f"quantize=true {self.verb} it (lossy)") from None  # fmt: skip
            coded = self.quantize(weight)
            note = f", quantised: weight error {relative_error(weight, coded.dequantize()):.3f} (relative L2)"
            if self.count_zeros:
                note += f", {float((coded.codes == 0).mean()):.0%} zeros"
            return coded, note
        if not np.array_equal(coded.dequantize(weight.dtype), weight):  # float32 scale x code reproduces W
            raise Skip(f"its {self.kind} form does not reproduce the float32 weight exactly")
        return coded, ""


def lower_coded_layers(
    model: ir.Model, codec: Codec, *, exclude: tuple[str, ...], quantize: bool, pack: bool, binary_activations: bool
) -> bool:
    """Lower every layer of ``model`` whose weight ``codec`` codes (the module docstring); True if one was."""
    rewriter = WeightRewriter(model)
    lowered = binary_layers = 0
    binarizers: dict[ir.Node, str] = {}
    for node in list(model.graph):
        if node.graph is not model.graph or node.domain != "" or node.op_type not in LAYER_OPS:
            continue
        if node.name in exclude:
            logger.info("%s not lowered: it is excluded", describe(node))
            continue
        try:
            match = rewriter.match_layer(node)
            coded, note = codec.coded(match.weight, quantize)
        except Skip as reason:
            logger.info("%s not lowered: %s", describe(node), reason)
            continue
        if not pack:
            lowered += rewriter.set_weight(match, coded.dequantize())
            continue
        mode, binarizer = "none", None
        if codec.xnor and binary_activations:
            mode, binarizer = rewriter.binarized_input(match)
        if mode != "none" and match.is_conv and match.group != 1:
            logger.info("%s: grouped (group=%d): lowered weight-only, not xnor/popcount", describe(node), match.group)
            mode, binarizer = "none", None
        bits = codec.pack(coded)
        scale, bias, fused = rewriter.epilogue(match, coded.scale)
        arrays = {"weight_bits": bits, "scale": scale}
        if bias is not None:
            arrays["bias"] = bias
        attributes = {**codec.attributes, **({"binarize_input": mode} if codec.xnor else {}), **match.conv}
        before = match.weight.nbytes
        new = rewriter.replace(match, codec.ops[0] if match.is_conv else codec.ops[1], arrays, attributes, match.data)
        activation = rewriter.fuse_activation(new)
        if binarizer is not None:
            binarizers[binarizer] = mode
        after = bits.nbytes + scale.nbytes
        rewriter.bytes_before += before
        rewriter.bytes_after += after
        lowered += 1
        binary_layers += mode != "none"
        parts = [codec.label] if codec.label else []
        parts.append("binary activations" if mode != "none" else "weight-only")
        logger.info(
            "%s -> edgec.%s (%s%s%s)%s: weights %d B -> %d B (%.1fx)",
            describe(node), new.op_type, ", ".join(parts), fused,
            f", {activation} fused" if activation != "none" else "", note, before, after, before / after,
        )  # fmt: skip
    removed = rewriter.bypass_binarizers(binarizers)
    if lowered:
        activations = (
            f", {binary_layers} with binary activations ({removed} binarising node(s) absorbed)" if codec.xnor else ""
        )
        logger.info(
            "%s: lowered %d layer(s)%s; weights %d B -> %d B (%.1fx)",
            codec.kind, lowered, activations, rewriter.bytes_before, rewriter.bytes_after,
            rewriter.bytes_before / max(rewriter.bytes_after, 1),
        )  # fmt: skip
    return lowered > 0


@dataclasses.dataclass(frozen=True)
class CodedWeightPass(ir.passes.InPlacePass):
    """What every coded-weight pass shares: the options below, their checks and the driver.

    A subclass names itself (``cli_name``), adds its own options (its ``quantize``
    help says its lossy rule) and says how weights are coded (``codec()``).
    """

    scale: Literal["per-channel", "per-tensor"] = dataclasses.field(
        default="per-channel", metadata=option_help("one scale a per output channel, or one per layer")
    )
    quantize: bool = dataclasses.field(default=False, metadata=option_help("code float weights too (lossy)"))
    exclude: tuple[str, ...] = dataclasses.field(
        default=(), metadata=option_help("node names to leave in float (e.g. the first and last layers)")
    )
    pack: bool = dataclasses.field(
        default=True,
        metadata=option_help(
            "false: keep float Conv/Gemm with the weights the codes stand for (the standard-ONNX "
            "equivalent, which ONNX Runtime runs; every packed build is checked against it)"
        ),
    )

    def __post_init__(self) -> None:
        if self.scale not in ("per-channel", "per-tensor"):
            raise ValueError(f"scale must be per-channel or per-tensor, not {self.scale!r}")

    def requires(self, model: ir.Model) -> None:
        require_float_graph(model, self.cli_name)  # type: ignore[attr-defined]
        require_node_names(model, self.exclude, "exclude", self.cli_name)  # type: ignore[attr-defined]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = lower_coded_layers(
            model, self.codec(), exclude=self.exclude, quantize=self.quantize, pack=self.pack,
            binary_activations=self.reads_binary_activations(),
        )  # fmt: skip
        return ir.passes.PassResult(model, modified=modified)

    def codec(self) -> Codec:
        """This configuration's row of the codec table."""
        raise NotImplementedError

    def reads_binary_activations(self) -> bool:
        """Whether layers on binarised inputs run xnor/popcount (binary's option; weight-only otherwise)."""
        return False
