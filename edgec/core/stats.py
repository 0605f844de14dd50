"""Per-layer parameters and multiply-accumulates of an ONNX IR graph.

MACs per node (batch included):
    Conv           out_elems * (C_in / groups) * prod(kernel)
    ConvTranspose  in_elems * (C_out / groups) * prod(kernel)
    Gemm / MatMul  prod(output) * K  (K: the reduced dimension)
    edgec.BlockSparseConv / BlockSparseGemm   prod(output) / C_out * values.size
                   (the kept blocks' work: nnz * N * kh * kw per output position)
    edgec.BinaryConv / TernaryConv / BinaryGemm / TernaryGemm   as the float layer
                   they replace (with binary activations these are bit operations:
                   the count is the same, each one is cheaper)
Other ops count 0 MACs. Parameters are the elements of the initializers a
node reads; the model size is the bytes of all initializers.

int8 layers of a QDQ graph (``-p quantize-int8``, or quantized elsewhere): a
Conv / ConvTranspose / Gemm / MatMul whose weight is a DequantizeLinear of
int8 (or uint8) codes. ``LayerStats.int8`` gives its scales: the input's
(the DequantizeLinear in front of its data, when there is one), the weight's
(smallest and largest of the per-channel scales) and the output's (the
QuantizeLinear after it, through one Relu/Clip).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from edgec.core.model import is_standard


@dataclasses.dataclass(frozen=True)
class LayerStats:
    name: str
    op_type: str
    output_shape: tuple[int | str, ...] | None
    params: int
    macs: int
    int8: Int8Layer | None = None


@dataclasses.dataclass(frozen=True)
class Int8Layer:
    """The scales of an int8 layer (see the module docstring); None where there is no Q/DQ."""

    weight_dtype: str  # "int8" or "uint8"
    weight_scales: tuple[float, float]  # smallest and largest per-channel scale
    channels: int  # how many weight scales (1: per tensor)
    input_scale: float | None
    output_scale: float | None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        low, high = self.weight_scales
        weight = f"w {low:.3g}" if low == high else f"w {low:.3g}..{high:.3g}"
        parts = [f"x {self.input_scale:.3g}" if self.input_scale is not None else "x float", weight]
        parts.append(f"y {self.output_scale:.3g}" if self.output_scale is not None else "y float")
        return f"{self.weight_dtype} " + ", ".join(parts) + (f" ({self.channels} ch)" if self.channels > 1 else "")


@dataclasses.dataclass(frozen=True)
class ModelStats:
    layers: tuple[LayerStats, ...]
    params: int
    macs: int
    size_bytes: int
    op_counts: dict[str, int]

    def as_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "size_bytes": self.size_bytes, "op_counts": self.op_counts}


def _shape(value: ir.Value | None) -> tuple[int | str, ...] | None:
    if value is None or value.shape is None:
        return None
    return tuple(dim if isinstance(dim, int) else str(dim) for dim in value.shape)


def _static(shape) -> bool:
    return shape is not None and all(isinstance(dim, int) for dim in shape)


def node_macs(node: ir.Node) -> int:
    """Multiply-accumulates of one node (0 when shapes are unknown or the op has none)."""
    op = node.op_type
    if node.domain == "edgec" and op in ("BlockSparseConv", "BlockSparseGemm"):
        # kept blocks only: every output position takes values.size (nnz * N * kh * kw) multiply-adds
        output, values = _shape(node.outputs[0]), node.inputs[1].const_value if len(node.inputs) > 1 else None
        if values is None or not _static(output):
            return 0
        return math.prod(output) // output[1] * values.size
    if node.domain == "edgec" and op in ("BinaryConv", "TernaryConv", "BinaryGemm", "TernaryGemm"):
        return _low_bit_macs(node)
    if not is_standard(node) or op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return 0
    inputs = [_shape(value) for value in node.inputs]
    output = _shape(node.outputs[0])
    if len(inputs) < 2 or not _static(inputs[0]) or not _static(inputs[1]):
        return 0
    weight = inputs[1]
    if op == "Conv":
        if not _static(output):
            return 0
        return math.prod(output) * math.prod(weight[1:])
    if op == "ConvTranspose":
        return math.prod(inputs[0]) * math.prod(weight[1:])
    if op == "Gemm":
        trans_a = node.attributes.get_int("transA", 0)
        rows = inputs[0][1] if trans_a else inputs[0][0]
        inner = inputs[0][0] if trans_a else inputs[0][1]
        trans_b = node.attributes.get_int("transB", 0)
        cols = weight[0] if trans_b else weight[1]
        return rows * inner * cols
    if not _static(output):
        return 0
    return math.prod(output) * inputs[0][-1]


def _low_bit_macs(node: ir.Node) -> int:
    x, bits, output = _shape(node.inputs[0]), _shape(node.inputs[1]), _shape(node.outputs[0])
    if not (_static(x) and _static(bits) and _static(output)):
        return 0
    if node.op_type.endswith("Gemm"):
        return math.prod(output) * x[1]
    # weight bits: (C_out, kh, kw, bytes), ternary with a leading plane axis (2, C_out, kh, kw, bytes)
    kh, kw = bits[-3], bits[-2]
    return math.prod(output) * (x[1] // node.attributes.get_int("group", 1)) * kh * kw


def _dequantized(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear producing ``value`` with a constant scale, if that is what produces it."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or not is_standard(node) or len(node.inputs) < 2:
        return None
    return node if node.inputs[1] is not None and node.inputs[1].const_value is not None else None


def _scale(node: ir.Node | None) -> float | None:
    return float(np.asarray(node.inputs[1].const_value.numpy()).reshape(-1)[0]) if node is not None else None


def _output_quantizer(node: ir.Node) -> ir.Node | None:
    """The QuantizeLinear reading the node's output, directly or through one Relu/Clip."""
    value = node.outputs[0]
    for _ in range(2):
        users = [user for user, _ in value.uses()]
        if len(users) != 1:
            return None
        (user,) = users
        if user.op_type == "QuantizeLinear" and len(user.inputs) > 1 and user.inputs[1] is not None:
            return user if user.inputs[1].const_value is not None else None
        if user.op_type not in ("Relu", "Clip"):
            return None
        value = user.outputs[0]
    return None


def int8_layer(node: ir.Node) -> Int8Layer | None:
    """The int8 scales of a Conv/ConvTranspose/Gemm/MatMul with DequantizeLinear'd int8 weights, else None."""
    if not is_standard(node) or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return None
    weight = _dequantized(node.inputs[1]) if len(node.inputs) > 1 else None
    codes = weight.inputs[0].const_value if weight is not None and weight.inputs[0] is not None else None
    if codes is None or codes.dtype not in (ir.DataType.INT8, ir.DataType.UINT8):
        return None
    scales = np.asarray(weight.inputs[1].const_value.numpy(), np.float64).reshape(-1)
    return Int8Layer(
        weight_dtype="int8" if codes.dtype == ir.DataType.INT8 else "uint8",
        weight_scales=(float(scales.min()), float(scales.max())),
        channels=int(scales.size),
        input_scale=_scale(_dequantized(node.inputs[0])),
        output_scale=_scale(_output_quantizer(node)),
    )


def node_params(node: ir.Node) -> int:
    return sum(
        value.const_value.size
        for value in node.inputs
        if value is not None and value.is_initializer() and value.const_value is not None
    )


def model_stats(graph: ir.Model) -> ModelStats:
    layers = []
    op_counts: dict[str, int] = {}
    for node in graph.graph:
        key = node.op_type if is_standard(node) else f"{node.domain}.{node.op_type}"
        op_counts[key] = op_counts.get(key, 0) + 1
        output = node.outputs[0] if node.outputs else None
        layers.append(
            LayerStats(node.name or "", key, _shape(output), node_params(node), node_macs(node), int8_layer(node))
        )
    size = sum(
        value.const_value.nbytes for value in graph.graph.initializers.values() if value.const_value is not None
    )
    params = sum(
        value.const_value.size for value in graph.graph.initializers.values() if value.const_value is not None
    )
    return ModelStats(tuple(layers), params, sum(layer.macs for layer in layers), size, op_counts)
