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
"""

from __future__ import annotations

import dataclasses
import math

import onnx_ir as ir


@dataclasses.dataclass(frozen=True)
class LayerStats:
    name: str
    op_type: str
    output_shape: tuple[int | str, ...] | None
    params: int
    macs: int


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
    if node.domain not in ("", "ai.onnx") or op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
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
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        op_counts[key] = op_counts.get(key, 0) + 1
        output = node.outputs[0] if node.outputs else None
        layers.append(LayerStats(node.name or "", key, _shape(output), node_params(node), node_macs(node)))
    size = sum(
        value.const_value.nbytes for value in graph.graph.initializers.values() if value.const_value is not None
    )
    params = sum(
        value.const_value.size for value in graph.graph.initializers.values() if value.const_value is not None
    )
    return ModelStats(tuple(layers), params, sum(layer.macs for layer in layers), size, op_counts)
