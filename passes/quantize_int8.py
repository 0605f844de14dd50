"""int8 post-training quantization to standard QDQ ONNX (``-p quantize-int8``).

A Conv / Gemm / MatMul with a constant float32 weight becomes, in ONNX
Runtime's QDQ format::

    x -> QuantizeLinear(s_x, zp_x) -> DequantizeLinear -> Conv -> [Relu|Clip] -> y
                        W_q int8 -> DequantizeLinear(s_w, axis) -^   ^- DequantizeLinear(s_x * s_w) <- b_q int32
    y -> QuantizeLinear(s_y, zp_y) -> DequantizeLinear -> (every reader of y)

Weights are symmetric int8 per output channel, activations asymmetric uint8
per tensor, the bias int32 at scale ``s_x * s_w`` (the formulas are in
passes/int8_math.py). A Relu or Clip that is the layer's only reader is
taken into the layer's output: ``y`` is the activation's output, its range
calibrated there (a ReLU output has zero point 0 and the full 0..255). A
tensor read by several quantized layers gets one Q/DQ pair. Graph outputs
stay float.

Activation ranges come from ONNX Runtime running the float graph on the
calibration samples (passes/calibration.py; ``method`` = minmax, percentile
or entropy). Without ``calibration=`` the pass refuses and says what to give.

Kept in float, each with an INFO line saying why: ``exclude=`` nodes; the
first and the last quantizable layer in graph order unless
``keep_first_last=false`` (they are the most sensitive: raw pixels in,
logits out); layers whose weight is not a constant float32 tensor, or is
already the output of a DequantizeLinear (a QDQ model); Gemm with transA,
alpha != 1, or a bias C that is not a vector with beta = 1 (then C stays
float); data inputs that are not float32.

The result runs in ONNX Runtime as it is (it is the verification reference
of every int8 build), and edgec compiles it (edgec/lower.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from edgec.core.model import onnx_opset
from edgec.passes.calibration import NO_CALIBRATION, RANGES_META, CalibratedRanges, activation_ranges, calibration_samples
from edgec.passes.constants import Constants
from edgec.passes.graph_edit import GraphEditor, describe, input_at
from edgec.passes.int8_math import ActivationQuant, quantize_bias, quantize_weight
from edgec.passes.options import BLOCK_SPARSE_LAYER, option_help, require_node_names, require_standard_ops

logger = logging.getLogger(__name__)

__all__ = ["QuantizeInt8Pass"]

LAYER_OPS = ("Conv", "Gemm", "MatMul")
_ACTIVATIONS = ("Relu", "Clip")
MIN_OPSET = 13  # per-axis DequantizeLinear


@dataclasses.dataclass
class _Layer:
    """A layer to quantize: its node, float weight, the weight's channel axis, its bias, and the
    tensor that carries its output (the Relu/Clip's when one is fused)."""

    node: ir.Node
    weight: np.ndarray
    axis: int
    bias: np.ndarray | None
    output: ir.Value


class _Skip(Exception):
    """A layer stays float; the message says why."""


@dataclasses.dataclass(frozen=True)
class QuantizeInt8Pass(ir.passes.InPlacePass):
    """Quantize Conv/Gemm/MatMul to int8 in standard QDQ ONNX, calibrated on the user's data.

    Per-channel symmetric int8 weights, per-tensor uint8 activations; see the module docstring.
    """

    cli_name: ClassVar[str] = "quantize-int8"

    calibration: str | Iterable[Any] | None = dataclasses.field(
        default=None,
        metadata=option_help(
            "a folder of .npy files (one sample each), or one .npy with a batch axis; Python: any iterable of arrays"
        ),
    )
    method: Literal["minmax", "percentile", "entropy"] = dataclasses.field(
        default="minmax", metadata=option_help("activation range: min/max, a percentile, or KL divergence (entropy)")
    )
    percentile: float = dataclasses.field(
        default=99.99, metadata=option_help("method=percentile: keep values between the (100-p)th and p-th percentile")
    )
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata=option_help("node names to keep in float"))
    keep_first_last: bool = dataclasses.field(
        default=True, metadata=option_help("keep the first and the last Conv/Gemm/MatMul in float")
    )

    def __post_init__(self) -> None:
        if self.method not in ("minmax", "percentile", "entropy"):
            raise ValueError(f"method must be minmax, percentile or entropy, not {self.method!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], not {self.percentile!r}")

    def requires(self, model: ir.Model) -> None:
        if self.calibration is None:
            raise ir.passes.PreconditionError(NO_CALIBRATION)
        require_standard_ops(model, self.cli_name)
        require_node_names(model, self.exclude, "exclude", self.cli_name)
        opset = onnx_opset(model)
        if opset < MIN_OPSET:
            raise ir.passes.PreconditionError(
                f"the model has ONNX opset {opset}; per-channel DequantizeLinear needs opset {MIN_OPSET} or newer: "
                "export it again with a newer opset (torch.onnx.export(..., opset_version=17))"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = self._layers(model)
        if not layers:
            logger.info("quantize-int8: no layer to quantize")
            return ir.passes.PassResult(model, modified=False)
        tensors: dict[str, ir.Value] = {}
        for layer in layers:
            tensors.setdefault(layer.node.inputs[0].name, layer.node.inputs[0])
            if not layer.output.is_graph_output():
                tensors.setdefault(layer.output.name, layer.output)
        quant = self._ranges(model, list(tensors))
        model.meta[RANGES_META] = dict(quant)
        edit = GraphEditor(model)
        before = after = 0
        for layer in layers:
            before += layer.weight.nbytes + (layer.bias.nbytes if layer.bias is not None else 0)
            after += _quantize_layer(edit, layer, quant[layer.node.inputs[0].name])
        for name, value in tensors.items():
            _insert_qdq(edit, value, quant[name])
        model.graph.sort()
        logger.info(
            "quantize-int8: %d layers int8, weights %d -> %d bytes (%.2fx smaller)", len(layers), before, after, before / after
        )
        return ir.passes.PassResult(model, modified=True)

    def standard_form(self, quantized: ir.Model) -> QuantizeInt8Pass:
        """This pass for the standard twin of ``quantized`` (edgec/apply_passes.py): the same
        options with the ranges ``quantized`` was given, not a second calibration of the twin."""
        ranges = quantized.meta.get(RANGES_META)
        return self if ranges is None else dataclasses.replace(self, calibration=CalibratedRanges(ranges))

    def _ranges(self, model: ir.Model, names: list[str]) -> dict:
        if isinstance(self.calibration, CalibratedRanges):
            missing = [name for name in names if name not in self.calibration]
            if missing:
                raise ir.passes.PreconditionError(f"no calibrated range for tensor(s) {', '.join(missing)}")
            return {name: self.calibration[name] for name in names}
        try:
            feeds = calibration_samples(self.calibration, list(model.graph.inputs))
        except (ValueError, OSError) as error:
            raise ir.passes.PreconditionError(str(error)) from None
        quant = activation_ranges(model, names, feeds, self.method, self.percentile)
        logger.info("quantize-int8: %d activation tensors calibrated on %d samples (%s)", len(quant), len(feeds), self.method)
        return quant

    # ---- matching ---------------------------------------------------------

    def _layers(self, model: ir.Model) -> list[_Layer]:
        constant = Constants(model)
        candidates = []
        for node in model.graph:
            if node.domain != "" or node.op_type not in LAYER_OPS:  # block-sparse layers (edgec ops) stay float
                continue
            try:
                candidates.append(_match(node, constant))
            except _Skip as reason:
                logger.info("quantize-int8 keeps %s in float: %s", describe(node), reason)
        chosen = []
        for index, layer in enumerate(candidates):
            node = layer.node
            if node.name in self.exclude:
                logger.info("quantize-int8 keeps %s in float: excluded", describe(node))
            elif self.keep_first_last and index in (0, len(candidates) - 1):
                which = "first" if index == 0 else "last"
                logger.info("quantize-int8 keeps %s in float: the %s layer (keep_first_last=false quantizes it)", describe(node), which)
            else:
                chosen.append(layer)
        return chosen


def _match(node: ir.Node, constant: Constants) -> _Layer:
    """The layer as a _Layer, or _Skip saying why it stays float."""
    if BLOCK_SPARSE_LAYER in node.metadata_props:  # pruned by block-sparse with pack=false (or the packed graph's twin)
        raise _Skip(f"a {node.metadata_props[BLOCK_SPARSE_LAYER]} block-sparse layer (no int8 1xN kernels: kept float)")
    data, weight_value = input_at(node, 0), input_at(node, 1)
    if data is None or weight_value is None or len(node.outputs) != 1:
        raise _Skip("it has no data or weight input")
    for value, what in ((data, "input"), (weight_value, "weight")):
        producer = value.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            raise _Skip(f"its {what} '{value.name}' is already dequantized (a QDQ graph)")
    if data.type is not None and data.type.dtype != ir.DataType.FLOAT:
        raise _Skip(f"its input is {data.type.dtype}, not float32")
    weight = constant(weight_value)
    if weight is None:
        raise _Skip(f"its weight '{weight_value.name}' is not a constant")
    if weight.dtype != np.float32:
        raise _Skip(f"its weight is {weight.dtype}, not float32")
    bias_value = input_at(node, 2)
    bias = constant(bias_value) if bias_value is not None else None
    if node.op_type == "Conv":
        axis = 0
    elif node.op_type == "MatMul":
        if weight.ndim != 2:
            raise _Skip(f"its weight has {weight.ndim} dimensions, not 2")
        axis = 1
    else:
        if node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0:
            raise _Skip("Gemm with transA or alpha != 1")
        axis = 0 if node.attributes.get_int("transB", 0) else 1
        vector = bias is not None and bias.size == weight.shape[axis] and bias.ndim <= 2
        if bias is not None and not (vector and node.attributes.get_float("beta", 1.0) == 1.0):
            logger.info("quantize-int8: %s keeps its bias C in float (not a vector with beta = 1)", describe(node))
            bias = None
    if bias is not None and bias.dtype != np.float32:
        bias = None
    return _Layer(node, weight, axis, None if bias is None else bias.reshape(-1), _fused_output(node))


def _fused_output(node: ir.Node) -> ir.Value:
    """The layer's output, or that of a Relu/Clip (constant bounds) that is its only reader."""
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return output
    reader = uses[0].node
    if reader.domain == "" and reader.op_type in _ACTIVATIONS and uses[0].idx == 0 and reader.graph is node.graph:
        if all(value is None or value.const_value is not None for value in reader.inputs[1:]):
            return reader.outputs[0]
    return output


# ---- rewriting ------------------------------------------------------------


def _dequantize(edit: GraphEditor, reader: ir.Node, index: int, codes: np.ndarray, scale: np.ndarray, axis: int, base: str) -> int:
    """Input ``index`` of ``reader`` := DequantizeLinear(codes, scale, zero, axis); returns the bytes stored."""
    old = reader.inputs[index]
    codes_value = edit.new_initializer(codes, f"{base}_quantized")
    scale_value = edit.new_initializer(scale.astype(np.float32), f"{base}_scale")
    zero_value = edit.new_initializer(np.zeros(scale.shape, codes.dtype), f"{base}_zero_point")
    node = ir.node(
        "DequantizeLinear", [codes_value, scale_value, zero_value], attributes={"axis": axis},
        name=edit.unique(f"{base}_DequantizeLinear"),
    )  # fmt: skip
    node.outputs[0].name = edit.unique(f"{base}_dequantized")
    edit.graph.append(node)
    reader.replace_input_with(index, node.outputs[0])
    edit.drop_if_dead(old)
    return codes.nbytes + scale.nbytes + zero_value.const_value.nbytes


def _quantize_layer(edit: GraphEditor, layer: _Layer, input_quant: ActivationQuant) -> int:
    """The layer's weight (and bias) as int8 (int32) initializers behind DequantizeLinear; bytes stored."""
    node = layer.node
    base = node.name or node.outputs[0].name or node.op_type
    codes, scale = quantize_weight(layer.weight, layer.axis)
    stored = _dequantize(edit, node, 1, codes, scale, layer.axis, f"{base}_weight")
    if layer.bias is not None:
        bias_codes, bias_scale = quantize_bias(layer.bias, input_quant.scale, scale)
        stored += _dequantize(edit, node, 2, bias_codes, bias_scale, 0, f"{base}_bias")
    return stored


def _insert_qdq(edit: GraphEditor, value: ir.Value, quant: ActivationQuant) -> None:
    """``value`` -> QuantizeLinear -> DequantizeLinear, which every reader of ``value`` reads instead."""
    base = value.name
    scale = edit.new_initializer(np.array(quant.scale, np.float32), f"{base}_scale")
    zero = edit.new_initializer(np.array(quant.zero_point, np.uint8), f"{base}_zero_point")
    readers = list(value.uses())
    quantize = ir.node("QuantizeLinear", [value, scale, zero], name=edit.unique(f"{base}_QuantizeLinear"))
    quantize.outputs[0].name = edit.unique(f"{base}_quantized")
    dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], scale, zero], name=edit.unique(f"{base}_DequantizeLinear"))
    dequantize.outputs[0].name = edit.unique(f"{base}_dequantized")
    for node in (quantize, dequantize):
        edit.graph.append(node)
    quantize.outputs[0].type = ir.TensorType(ir.DataType.UINT8)
    quantize.outputs[0].shape = dequantize.outputs[0].shape = value.shape
    dequantize.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    for use in readers:
        use.node.replace_input_with(use.idx, dequantize.outputs[0])
