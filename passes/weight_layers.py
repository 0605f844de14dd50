"""Conv / Gemm / MatMul layers with a constant weight: matched, their epilogue found, replaced.

The graph plumbing of the coded-weight lowerings (binary, ternary; see
passes/coded_weights.py): ``WeightRewriter.match_layer`` gives the weight
output channels first with the layer's bias and Conv attributes (explicit
pads) or a ``Skip`` saying why not; ``epilogue`` folds Gemm's alpha and a
following inference BatchNormalization into the op's scale and bias;
``fuse_activation`` takes a following Relu/Clip into the op; ``replace``
puts the new op in the layer's place; ``binarized_input`` and
``bypass_binarizers`` find and absorb Sign / ``where(x >= 0, 1, -1)`` inputs.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from edgec.core.model import onnx_opset
from edgec.ops import DOMAIN, OPSET_VERSION
from edgec.passes.constants import Constants
from edgec.passes.batchnorm_math import batchnorm_scale_shift
from edgec.passes.graph_edit import GraphEditor, describe, input_at

logger = logging.getLogger(__name__)

__all__ = ["LAYER_OPS", "LayerMatch", "Skip", "WeightRewriter"]


class Skip(Exception):
    """A node is not lowered; the message says why."""


@dataclasses.dataclass
class LayerMatch:
    """A Conv or Gemm whose weight can be lowered.

    ``weight``: output channels first (Conv ``(O, C/g, kh, kw)``, Gemm ``(N, K)``).
    ``bias``: float64 ``(O,)`` or None. ``scale_factor``: Gemm's alpha (1 for a Conv).
    ``conv``: the Conv's ONNX attributes for the new op (explicit pads).
    """

    node: ir.Node
    data: ir.Value
    weight: np.ndarray
    bias: np.ndarray | None
    scale_factor: float
    conv: dict
    parameters: tuple[ir.Value | None, ...]
    tail: list[ir.Node] = dataclasses.field(default_factory=list)  # nodes after it replaced too (Add, BN)

    @property
    def is_conv(self) -> bool:
        return self.node.op_type == "Conv"

    @property
    def group(self) -> int:
        return int(self.conv.get("group", 1))


# Binarising patterns: the op -> binarize_input
_SIGN_OPS = {"Sign": "sign"}
_RESHAPES = ("Flatten", "Reshape")
_ACTIVATIONS = ("Relu", "Clip")
LAYER_OPS = ("Conv", "Gemm", "MatMul")


class WeightRewriter:
    """Matching and rewriting of Conv/Gemm layers into edgec ops (working state of one pass call)."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.opset = onnx_opset(model)
        self.edit = GraphEditor(model)
        self.constant = Constants(model)
        self.bytes_before = 0
        self.bytes_after = 0

    # ---- matching ---------------------------------------------------------

    def match_layer(self, node: ir.Node) -> LayerMatch:
        """The Conv/Gemm as a LayerMatch, or Skip with the reason."""
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            raise Skip("it has no weight input")
        weight = self.constant(node.inputs[1])
        if weight is None:
            raise Skip(f"its weight '{node.inputs[1].name}' is not a constant")
        if weight.dtype != np.float32:
            raise Skip(f"its weight is {weight.dtype}, not float32")
        bias_value = input_at(node, 2)
        bias = self.constant(bias_value)
        if bias_value is not None and bias is None:
            raise Skip(f"its bias '{bias_value.name}' is not a constant")
        if len(node.outputs) != 1:
            raise Skip("it has more than one output")
        if node.op_type == "MatMul":
            return self._matmul(node, weight)
        if node.op_type == "Conv":
            conv = self._conv_attributes(node, weight)
            if bias is not None:
                bias = bias.astype(np.float64).reshape(-1)
            return LayerMatch(node, node.inputs[0], weight, bias, 1.0, conv, tuple(node.inputs[1:]))
        return self._gemm(node, weight, bias)

    def _conv_attributes(self, node: ir.Node, weight: np.ndarray) -> dict:
        if weight.ndim != 4:
            raise Skip(f"it is a {weight.ndim - 2}-D convolution; the binary and ternary ops are 2-D")
        kernel = tuple(int(dim) for dim in weight.shape[2:])
        strides = tuple(node.attributes.get_ints("strides", (1, 1)))
        dilations = tuple(node.attributes.get_ints("dilations", (1, 1)))
        group = node.attributes.get_int("group", 1)
        auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        if auto_pad in ("NOTSET", ""):
            pads = tuple(node.attributes.get_ints("pads", (0, 0, 0, 0)))
        elif auto_pad == "VALID":
            pads = (0, 0, 0, 0)
        else:
            shape = node.inputs[0].shape
            if shape is None or len(shape) != 4 or not all(isinstance(dim, int) for dim in shape[2:]):
                raise Skip(f"it has auto_pad={auto_pad} and its input's spatial shape is not static")
            begins, ends = [], []
            for size, k, s, d in zip(shape[2:], kernel, strides, dilations, strict=True):
                total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
                small, large = total // 2, total - total // 2
                begins.append(small if auto_pad == "SAME_UPPER" else large)
                ends.append(large if auto_pad == "SAME_UPPER" else small)
            pads = (*begins, *ends)
        return {
            "kernel_shape": list(kernel),
            "strides": list(strides),
            "pads": list(pads),
            "dilations": list(dilations),
            "group": int(group),
        }

    def _gemm(self, node: ir.Node, weight: np.ndarray, bias: np.ndarray | None) -> LayerMatch:
        if node.attributes.get_int("transA", 0):
            raise Skip("it has transA=1 (the activations transposed)")
        if weight.ndim != 2:
            raise Skip(f"its weight has rank {weight.ndim}, not 2")
        rows = weight if node.attributes.get_int("transB", 0) else weight.T  # (N, K)
        out_features = rows.shape[0]
        if bias is not None:
            if bias.size == 1:
                bias = np.full(out_features, float(bias.reshape(-1)[0]))
            elif bias.size == out_features and (bias.ndim == 1 or bias.shape == (1, out_features)):
                bias = bias.reshape(-1).astype(np.float64)
            else:
                raise Skip(f"its C of shape {bias.shape} is not one value per output column ({out_features})")
            bias = bias * node.attributes.get_float("beta", 1.0)
        alpha = node.attributes.get_float("alpha", 1.0)
        return LayerMatch(node, node.inputs[0], np.ascontiguousarray(rows), bias, alpha, {}, tuple(node.inputs[1:]))

    def _matmul(self, node: ir.Node, weight: np.ndarray) -> LayerMatch:
        """MatMul(A, B) with a 2-D constant B (K, N) and a 2-D A, plus a following Add of a
        per-column constant as the bias."""
        if weight.ndim != 2:
            raise Skip(f"its weight has rank {weight.ndim}, not 2")
        data = node.inputs[0]
        producer = data.producer()
        rank = len(data.shape) if data.shape is not None else (2 if producer is not None and producer.op_type == "Flatten" else None)
        if rank != 2:
            raise Skip(f"its input has rank {rank if rank is not None else 'unknown'}, not 2 (a Gemm-like MatMul)")
        out_features = weight.shape[1]
        match = LayerMatch(node, data, np.ascontiguousarray(weight.T), None, 1.0, {}, (node.inputs[1],))
        output = node.outputs[0]
        uses = output.uses()
        if output.is_graph_output() or len(uses) != 1:
            return match
        add = uses[0].node
        if add.domain != "" or add.op_type != "Add" or len(add.inputs) != 2:
            return match
        other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
        bias = self.constant(other)
        if bias is None or bias.size != out_features or bias.shape not in ((out_features,), (1, out_features)):
            return match
        match.bias = bias.reshape(-1).astype(np.float64)
        match.tail.append(add)
        match.parameters = (node.inputs[1], other)
        return match

    def binarized_input(self, match: LayerMatch) -> tuple[str, ir.Node | None]:
        """(binarize_input, the binarising node) of the layer's input; ("none", None) for float inputs."""
        value = match.data
        producer = value.producer()
        if not match.is_conv:  # a Gemm's input may be a flattened binary tensor
            while producer is not None and producer.domain == "" and producer.op_type in _RESHAPES:
                value = producer.inputs[0]
                producer = value.producer() if value is not None else None
        if producer is None or producer.domain != "":
            return "none", None
        mode = _SIGN_OPS.get(producer.op_type) or self._where_sign(producer)
        if mode is None:
            return "none", None
        return mode, (producer if value is match.data else None)

    def _where_sign(self, node: ir.Node) -> str | None:
        """``sign_ge0`` for Where(x >= 0, 1, -1) / Where(x < 0, -1, 1) with scalar constants."""
        if node.op_type != "Where" or len(node.inputs) != 3 or None in node.inputs:
            return None
        condition = node.inputs[0].producer()
        if condition is None or condition.domain != "" or len(condition.inputs) != 2:
            return None
        expected = {"GreaterOrEqual": (1.0, -1.0), "Less": (-1.0, 1.0)}.get(condition.op_type)
        if expected is None:
            return None
        zero = self.constant(condition.inputs[1])
        if zero is None or zero.size != 1 or float(zero.reshape(-1)[0]) != 0.0 or self.constant(condition.inputs[0]) is not None:
            return None
        branches = [self.constant(item) for item in node.inputs[1:]]
        if any(branch is None or branch.size != 1 for branch in branches):
            return None
        if tuple(float(branch.reshape(-1)[0]) for branch in branches) != expected:
            return None
        return "sign_ge0"

    @staticmethod
    def binarized_source(node: ir.Node) -> ir.Value:
        """The tensor a binarising node binarises (Sign's input, the compared x of a Where)."""
        if node.op_type == "Where":
            return node.inputs[0].producer().inputs[0]
        return node.inputs[0]

    def absorb_batchnorm(self, match: LayerMatch, out_channels: int) -> tuple[np.ndarray, np.ndarray] | None:
        """When the layer's only consumer is an inference BatchNormalization with constant
        per-channel statistics, add it to ``match.tail`` and return its ``(scale, shift)``
        (float64, ``BN(y) = y * scale + shift``); else None (the BN stays, and runs as its own op)."""
        output = (match.tail[-1] if match.tail else match.node).outputs[0]
        uses = output.uses()
        if output.is_graph_output() or len(uses) != 1:
            return None
        node = uses[0].node
        if node.domain != "" or node.op_type != "BatchNormalization" or node.inputs[0] is not output or len(node.inputs) != 5:
            return None
        if node.attributes.get_int("training_mode", 0) or not node.attributes.get_int("spatial", 1):
            return None
        if any(extra.uses() or extra.is_graph_output() for extra in node.outputs[1:]):
            return None
        arrays = [self.constant(value) for value in node.inputs[1:]]
        if any(array is None or array.shape != (out_channels,) for array in arrays):
            logger.info("%s stays after %s: its statistics are not constant (C,) vectors", describe(node), describe(match.node))
            return None
        gamma, beta, running_mean, running_var = arrays
        scale, shift = batchnorm_scale_shift(running_mean, running_var, gamma, beta, node.attributes.get_float("epsilon", 1e-5))
        match.tail.append(node)
        match.parameters = (*match.parameters, *node.inputs[1:])
        return scale, shift

    def epilogue(self, match: LayerMatch, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, str]:
        """The op's float32 ``(scale, bias)`` with Gemm's alpha and a following BatchNormalization
        folded in (``scale * s``, ``bias * s + t``), and a note for the log."""
        scale = np.asarray(scale, np.float64) * match.scale_factor
        bias = match.bias
        folded = self.absorb_batchnorm(match, scale.shape[0])
        note = ""
        if folded is not None:
            bn_scale, bn_shift = folded
            scale = scale * bn_scale
            bias = (0.0 if bias is None else bias) * bn_scale + bn_shift
            note = ", BatchNormalization fused"
        return scale.astype(np.float32), None if bias is None else np.asarray(bias, np.float32), note

    def fusable_activation(self, output: ir.Value) -> tuple[ir.Node, str, float, float] | None:
        """(node, activation, low, high) of a Relu/Clip that is ``output``'s only consumer."""
        uses = output.uses()
        if output.is_graph_output() or len(uses) != 1:
            return None
        node = uses[0].node
        if node.domain != "" or node.op_type not in _ACTIVATIONS or node.inputs[0] is not output:
            return None
        if node.op_type == "Relu":
            return node, "Relu", 0.0, float("inf")
        if self.opset < 11:
            low = node.attributes.get_float("min", float("-inf"))
            high = node.attributes.get_float("max", float("inf"))
            return node, "Clip", low, high
        bounds = []
        for index, default in ((1, float("-inf")), (2, float("inf"))):
            value = node.inputs[index] if len(node.inputs) > index else None
            if value is None:
                bounds.append(default)
                continue
            array = self.constant(value)
            if array is None or array.size != 1:
                return None
            bounds.append(float(array.reshape(-1)[0]))
        return node, "Clip", bounds[0], bounds[1]

    # ---- rewriting --------------------------------------------------------

    def set_weight(self, match: LayerMatch, weight: np.ndarray) -> bool:
        """Give the layer the float32 ``weight`` (output channels first, as ``match.weight``) in
        its node's own layout: the standard-ONNX form of a lowered layer (``pack=false``).
        False, and nothing changed, when that is its weight already."""
        weight = np.asarray(weight, np.float32)
        if np.array_equal(weight, match.weight):
            return False
        node = match.node
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not node.attributes.get_int("transB", 0))
        array = np.ascontiguousarray(weight.T if transposed else weight)
        self.edit.set_input(node, 1, array, f"{node.name or node.op_type}_weight")
        return True

    def replace(self, match: LayerMatch, op_type: str, arrays: dict[str, np.ndarray], attributes: dict, data: ir.Value) -> ir.Node:
        """Put ``edgec.<op_type>(data, *arrays)`` in place of the layer; its output keeps the old name."""
        node = match.node
        chain = [node, *match.tail]
        base = node.name or node.op_type
        inputs = [data] + [self.edit.new_initializer(array, f"{base}_{role}") for role, array in arrays.items()]
        new = ir.Node(DOMAIN, op_type, inputs, attributes=_attributes(attributes), name=node.name)
        self.graph.insert_after(chain[-1], new)
        self.edit.replace_node(chain[-1], new.outputs[0])
        self.edit.remove(reversed(chain[:-1]))  # their outputs fed only the next one, now gone
        for value in match.parameters:
            self.edit.drop_if_dead(value)
        if DOMAIN not in self.model.opset_imports:
            self.model.opset_imports[DOMAIN] = OPSET_VERSION
        return new

    def fuse_activation(self, new: ir.Node) -> str:
        """Fuse the Relu/Clip after ``new`` into it (attributes ``activation``, ``activation_min/max``)."""
        found = self.fusable_activation(new.outputs[0])
        if found is None:
            return "none"
        node, activation, low, high = found
        new.attributes["activation"] = ir.AttrString("activation", activation)
        if activation == "Clip":
            new.attributes["activation_min"] = ir.AttrFloat32("activation_min", low)
            new.attributes["activation_max"] = ir.AttrFloat32("activation_max", high)
        parameters = list(node.inputs[1:])
        self.edit.replace_node(node, new.outputs[0])
        for value in parameters:
            self.edit.drop_if_dead(value)
        return activation

    def bypass_binarizers(self, binarizers: dict[ir.Node, str]) -> int:
        """Let the binary ops read what a binarising node binarises when they are its only
        consumers; remove the node. Returns how many were removed."""
        removed = 0
        for node, mode in binarizers.items():
            if node.graph is not self.graph:
                continue
            output = node.outputs[0]
            uses = output.uses()
            if output.is_graph_output() or not uses:
                continue
            if not all(
                use.node.domain == DOMAIN
                and use.idx == 0
                and use.node.attributes.get_string("binarize_input", "none") == mode
                for use in uses
            ):
                continue
            source = self.binarized_source(node)
            for use in list(uses):
                use.node.replace_input_with(0, source)
            self.edit.drop_if_dead(output)
            removed += 1
        return removed


def _attributes(values: dict) -> list[ir.Attr]:
    attributes = []
    for name, value in values.items():
        if isinstance(value, str):
            attributes.append(ir.AttrString(name, value))
        elif isinstance(value, bool) or isinstance(value, int):
            attributes.append(ir.AttrInt64(name, int(value)))
        elif isinstance(value, float):
            attributes.append(ir.AttrFloat32(name, value))
        else:
            attributes.append(ir.AttrInt64s(name, [int(item) for item in value]))
    return attributes
