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
over bit-packed channels, zero padding exact (see edgec/ops/binary_conv.py).
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

Nothing is lowered, and an INFO line names the node and says why, when: the
weight is not a constant, or not float32; it is not binary per channel
(without ``quantize``; the channel and its values are named); the Conv is
not 2-D, or has ``auto_pad=SAME_*`` without a static input shape; a Gemm has
``transA=1`` or a ``C`` that is not one value per output column; a MatMul's
input is not 2-D; the node is in ``exclude``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from edgec.ops import DOMAIN, OPSET_VERSION
from edgec.ops.binary.format import pack_bits
from edgec.passes.constants import Constants
from edgec.passes.fold_batchnorm import batchnorm_scale_shift
from edgec.passes.graph_edit import GraphEditor, describe
from edgec.passes.registry import option_help, require_node_names

logger = logging.getLogger(__name__)

__all__ = [
    "LAYER_OPS",
    "CodedWeight",
    "LayerMatch",
    "LowerBinaryPass",
    "Skip",
    "WeightRewriter",
    "binary_bits",
    "binary_codes",
    "conv_bits",
    "quantize_binary",
    "relative_error",
]


# --------------------------------------------------------------------------
# The math: pure NumPy.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CodedWeight:
    """``W = scale[o] * codes[o, ...]``: ``codes`` int8 of W's shape, ``scale`` float64 ``(C_out,)``."""

    codes: np.ndarray
    scale: np.ndarray

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """The weight the codes stand for, computed as the op computes it (float32 scale x code)."""
        shape = (-1,) + (1,) * (self.codes.ndim - 1)
        return (self.scale.astype(np.float32).reshape(shape) * self.codes.astype(np.float32)).astype(dtype)


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


# --------------------------------------------------------------------------
# Graph plumbing shared with passes/lower_ternary.py.
# --------------------------------------------------------------------------


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
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
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
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias = None
        if bias_value is not None:
            bias = self.constant(bias_value)
            if bias is None:
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


# --------------------------------------------------------------------------
# The pass.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LowerBinaryPass(ir.passes.InPlacePass):
    """Lower Conv/Gemm/MatMul with binary weights to 1-bit edgec ops, xnor/popcount on Sign inputs.

    Weights ``+-a`` (or ``{0, a}``) per output channel become edgec.BinaryConv /
    edgec.BinaryGemm; see the module docstring.
    """

    cli_name: ClassVar[str] = "binary"

    encoding: Literal["sign", "magnitude"] = dataclasses.field(
        default="sign",
        metadata=option_help("sign: weights +-a (XNOR-Net, RBNN, ReCU); magnitude: weights 0 or a (SiMaN)"),
    )
    scale: Literal["per-channel", "per-tensor"] = dataclasses.field(
        default="per-channel", metadata=option_help("one scale a per output channel, or one per layer")
    )
    quantize: bool = dataclasses.field(
        default=False,
        metadata=option_help("binarise float weights too (lossy: XNOR-Net sign/mean|W|, SiMaN angle alignment)"),
    )
    binary_activations: bool = dataclasses.field(
        default=True,
        metadata=option_help("run layers whose input is Sign(x) or where(x>=0,1,-1) as xnor/popcount kernels"),
    )
    exclude: tuple[str, ...] = dataclasses.field(
        default=(), metadata=option_help("node names to leave in float (e.g. the first and last layers)")
    )
    pack: bool = dataclasses.field(
        default=True,
        metadata=option_help(
            "false: keep float Conv/Gemm with the +-a weights and the Sign nodes (the standard-ONNX "
            "equivalent, which ONNX Runtime runs; every packed build is checked against it)"
        ),
    )

    def __post_init__(self) -> None:
        if self.encoding not in ("sign", "magnitude"):
            raise ValueError(f"encoding must be sign or magnitude, not {self.encoding!r}")
        if self.scale not in ("per-channel", "per-tensor"):
            raise ValueError(f"scale must be per-channel or per-tensor, not {self.scale!r}")

    def requires(self, model: ir.Model) -> None:
        require_node_names(model, self.exclude, "exclude", self.cli_name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rewriter = WeightRewriter(model)
        per_tensor = self.scale == "per-tensor"
        lowered = binary_layers = 0
        binarizers: dict[ir.Node, str] = {}
        for node in list(model.graph):
            if node.graph is not model.graph or node.domain != "" or node.op_type not in LAYER_OPS:
                continue
            if node.name in self.exclude:
                logger.info("%s not lowered: it is excluded", describe(node))
                continue
            try:
                match = rewriter.match_layer(node)
                coded, note = self._codes(match.weight, per_tensor)
            except Skip as reason:
                logger.info("%s not lowered: %s", describe(node), reason)
                continue
            if not self.pack:
                lowered += rewriter.set_weight(match, coded.dequantize())
                continue
            mode, binarizer = rewriter.binarized_input(match) if self.binary_activations else ("none", None)
            if mode != "none" and match.is_conv and match.group != 1:
                logger.info("%s: grouped (group=%d): lowered weight-only, not xnor/popcount", describe(node), match.group)
                mode, binarizer = "none", None
            bits = conv_bits(binary_bits(coded, self.encoding))
            scale, bias, fused = rewriter.epilogue(match, coded.scale)
            arrays = {"weight_bits": bits, "scale": scale}
            if bias is not None:
                arrays["bias"] = bias
            attributes = {"encoding": self.encoding, "binarize_input": mode, **match.conv}
            before = match.weight.nbytes
            new = rewriter.replace(match, "BinaryConv" if match.is_conv else "BinaryGemm", arrays, attributes, match.data)
            activation = rewriter.fuse_activation(new)
            if binarizer is not None:
                binarizers[binarizer] = mode
            after = bits.nbytes + scale.nbytes
            rewriter.bytes_before += before
            rewriter.bytes_after += after
            lowered += 1
            binary_layers += mode != "none"
            logger.info(
                "%s -> edgec.%s (%s, %s%s%s)%s: weights %d B -> %d B (%.1fx)",
                describe(node), new.op_type, self.encoding,
                "binary activations" if mode != "none" else "weight-only", fused,
                f", {activation} fused" if activation != "none" else "", note, before, after, before / after,
            )  # fmt: skip
        removed = rewriter.bypass_binarizers(binarizers)
        if lowered:
            logger.info(
                "binary: lowered %d layer(s), %d with binary activations (%d binarising node(s) absorbed); "
                "weights %d B -> %d B (%.1fx)",
                lowered, binary_layers, removed, rewriter.bytes_before, rewriter.bytes_after,
                rewriter.bytes_before / max(rewriter.bytes_after, 1),
            )  # fmt: skip
        return ir.passes.PassResult(model, modified=lowered > 0)

    def _codes(self, weight: np.ndarray, per_tensor: bool) -> tuple[CodedWeight, str]:
        try:
            coded = binary_codes(weight, self.encoding, per_tensor)
        except ValueError as reason:
            if not self.quantize:
                raise Skip(f"its weight is not binary ({self.encoding}, {self.scale}): {reason}; "
                           "quantize=true binarises it (lossy)") from None
            coded = quantize_binary(weight, self.encoding, per_tensor)
            return coded, f", quantised: weight error {relative_error(weight, coded.dequantize()):.3f} (relative L2)"
        if not np.array_equal(coded.dequantize(weight.dtype), weight):  # float32 scale x code reproduces W
            raise Skip("its binary form does not reproduce the float32 weight exactly")
        return coded, ""
