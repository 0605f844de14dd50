"""Fold inference-mode batch normalization into the layer before it.

A BatchNormalization in inference mode is a per-channel affine map of its
input ``y`` along the channel axis::

    inv_std = 1 / sqrt(running_var + epsilon)
    scale   = gamma * inv_std
    shift   = beta - running_mean * scale
    BN(y)   = y * scale + shift

When ``y = W (*) x + b`` comes from a linear layer whose output channel ``c``
is computed by slice ``c`` of ``W`` (Conv, ConvTranspose, Gemm, MatMul with a
constant weight), the affine map folds into that layer::

    W' = W * scale                       (along W's output-channel axis)
    b' = b * scale + shift = (b - running_mean) * gamma / sqrt(running_var + epsilon) + beta

with ``b = 0`` when the layer has no bias. The output-channel axis of W is:

    Conv           W: (C_out, C_in / group, k...)       axis 0
    ConvTranspose  W: (C_in, C_out / group, k...)       axis 1, and output channel
                   g * (C_out / group) + j is column j of input-channel block g
    Gemm           B: (K, N), or (N, K) with transB=1   axis 1, or 0
    MatMul         B: (K, N)                            axis 1 (the output's last axis)

Gemm's ``beta`` is folded into the new C (and dropped). A MatMul gains its
bias as an ``Add`` node (``MatMul -> Add``), which later folds reuse.

The same rule folds the other spellings of a per-channel affine map that
exporters leave behind a linear layer: ``Mul(y, s)`` (``shift = 0``) and
``Add(y, t)`` (``scale = 1``) with a constant ``s``/``t`` broadcasting along
the channel axis only, e.g. of shape (C, 1, 1) or (1, C, 1, 1) after a 2-D
Conv, so that ``y * s + t`` (a batch norm exported as Mul/Add, or Caffe's
Scale layer) folds like a BatchNormalization. Chains fold one op at a time,
in graph order.

Weights, biases and statistics must be constants: initializers that are not
graph inputs (a caller may override those; before IR version 4, which lists
every initializer as an input, they count as constants), or small constant
subgraphs (``Constant``, ``ConstantOfShape``, ``Identity`` of an initializer,
``Unsqueeze``, ``Shape`` of a static value, ``CastLike``...). Instead of
constant-folding the whole graph first, those subgraphs are evaluated (ONNX
reference ops) for the matched nodes only and die with them: the graph
changes only where something folds, so ``modified`` is exact.

Nothing folds, and an INFO log line says why, naming the node, when: the
input of the BatchNormalization is a graph input or comes from another op;
the layer's output has other consumers or is a graph output; a weight, bias
or statistic is not constant; the BatchNormalization is in training mode or
its running-statistics outputs are used; its statistics are not per channel;
channel counts disagree; a MatMul output is not rank 2 (BatchNormalization
normalises axis 1, a MatMul's channels are on the last axis). With
``lower_unfolded=true`` such a BatchNormalization (inference mode, constant
statistics) is instead rewritten as ``Mul(x, scale) -> Add(shift)``.

Only the main graph is rewritten (edgec's frontend inlines functions).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from edgec.core.model import onnx_opset
from edgec.passes.batchnorm_math import (
    batchnorm_scale_shift,
    fold_bias,
    scale_output_channels,
    scale_transposed_conv_weight,
)
from edgec.passes.constants import Constants
from edgec.passes.graph_edit import GraphEditor, describe, input_at, value_name
from edgec.passes.options import option_help

logger = logging.getLogger(__name__)

__all__ = ["FoldBatchNormPass"]


# --------------------------------------------------------------------------
# The pass: graph plumbing only.
# --------------------------------------------------------------------------

_LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_LINEAR_NAMES = "a Conv, ConvTranspose, Gemm or MatMul"
_BN_INPUTS = ("scale", "B", "input_mean", "input_var")
_MIN_OPSET = 7


@dataclasses.dataclass(frozen=True)
class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold BatchNormalization (and per-channel Mul/Add) into the Conv/ConvTranspose/Gemm/MatMul before it.

    ``W' = W * gamma / sqrt(var + eps)`` along W's output-channel axis and
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``; see the module
    docstring for the axes, the Mul/Add forms and when nothing folds.
    """

    cli_name: ClassVar[str] = "fold-bn"

    lower_unfolded: bool = dataclasses.field(
        default=False,
        metadata=option_help(
            "rewrite a BatchNormalization that cannot fold (e.g. after a Concat or a graph input) "
            "as Mul+Add, so none is left"
        ),
    )

    def requires(self, model: ir.Model) -> None:
        opset = onnx_opset(model, None)
        has_batchnorm = any(node.op_type == "BatchNormalization" and node.domain == "" for node in model.graph)
        if has_batchnorm and (opset is None or opset < _MIN_OPSET):
            raise ir.passes.PreconditionError(
                f"fold-bn needs ai.onnx opset >= {_MIN_OPSET} (inference-mode BatchNormalization); this model "
                f"imports opset {opset}. Convert it first: onnx.version_converter.convert_version(model, 17)"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rewriter = _Rewriter(model, lower_unfolded=self.lower_unfolded)
        for node in list(model.graph):
            if node.graph is model.graph:  # not removed by an earlier fold
                rewriter.visit(node)
        if rewriter.batchnorms:
            logger.info(
                "fold-bn: folded %d of %d BatchNormalization node(s), lowered %d to Mul+Add; folded %d Mul/Add node(s)",
                rewriter.folded_batchnorms,
                rewriter.batchnorms,
                rewriter.lowered,
                rewriter.folded_affine,
            )
        return ir.passes.PassResult(model, modified=rewriter.modified)


# --------------------------------------------------------------------------
# Working state of one call (a local of FoldBatchNormPass.call).
# --------------------------------------------------------------------------


class _Skip(Exception):
    """A match that must not fold; the message is the reason."""


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(dim) for dim in shape) + ("," if len(shape) == 1 else "") + ")"


@dataclasses.dataclass
class _Linear:
    """A matched linear layer: the node, its constant weight/bias, and where its channels are."""

    node: ir.Node
    output: ir.Value  # what the affine op reads (the bias Add's output for MatMul -> Add)
    weight: np.ndarray
    bias: np.ndarray | None
    channels: int
    rank: int | None  # rank of ``output``; None when unknown (MatMul on an unshaped input)
    channel_axis: int  # in ``output``; -1 for MatMul
    bias_node: ir.Node | None = None  # MatMul's bias Add, if any
    bias_index: int | None = None  # which input of bias_node is the bias


@dataclasses.dataclass
class _Affine:
    """A per-channel affine op ``y * scale + shift`` reading ``data`` (the layer's output)."""

    node: ir.Node
    data: ir.Value
    scale: np.ndarray | None  # float64 (C,), None = 1
    shift: np.ndarray | None  # float64 (C,), None = 0
    parameters: tuple[ir.Value | None, ...]  # the inputs that become dead after the fold


class _Rewriter:
    def __init__(self, model: ir.Model, *, lower_unfolded: bool) -> None:
        self.graph = model.graph
        self.lower_unfolded = lower_unfolded
        self.opset = onnx_opset(model)
        # Before IR version 4 every initializer had to be listed as a graph input too:
        # there such an input is a weight, not something a caller overrides.
        self.edit = GraphEditor(model)
        self.constant = Constants(model)
        self.ranks: dict[ir.Value, int | None] = {}
        self.modified = False
        self.batchnorms = self.folded_batchnorms = self.folded_affine = self.lowered = 0

    # ---- dispatch ---------------------------------------------------------

    def visit(self, node: ir.Node) -> None:
        if node.domain != "":
            return
        if node.op_type == "BatchNormalization":
            self.batchnorms += 1
            self._visit_batchnorm(node)
        elif node.op_type in ("Mul", "Add"):
            self._visit_mul_add(node)

    def _visit_batchnorm(self, node: ir.Node) -> None:
        try:
            statistics = self._batchnorm_statistics(node)
        except _Skip as reason:
            logger.info("%s not folded: %s", describe(node), reason)
            return
        data = node.inputs[0]
        scale, shift = statistics
        affine = _Affine(node, data, scale, shift, tuple(node.inputs[1:]))
        try:
            linear = self._linear_producer(data, node)
            self._check_batchnorm_channels(linear, affine)
        except _Skip as reason:
            if self.lower_unfolded and self._lower(affine):
                logger.info("%s not folded: %s; lowered to Mul+Add", describe(node), reason)
            else:
                logger.info("%s not folded: %s", describe(node), reason)
            return
        self._fold(linear, affine)
        self.folded_batchnorms += 1

    def _visit_mul_add(self, node: ir.Node) -> None:
        """Fold ``Mul(y, c)`` / ``Add(y, c)``; only a linear ``y`` and a constant ``c`` make a candidate."""
        if len(node.inputs) != 2 or any(value is None for value in node.inputs):
            return
        for data_index in (0, 1):
            data, other = node.inputs[data_index], node.inputs[1 - data_index]
            producer = data.producer()
            if producer is None or producer.domain != "":
                continue
            if producer.op_type == "MatMul" and node.op_type == "Add":
                return  # this Add is the MatMul's bias: part of the layer, nothing to fold
            if producer.op_type not in _LINEAR_OPS and self._biased_matmul(producer) is None:
                continue
            constant = self.constant(other)
            if constant is None:
                continue
            try:
                linear = self._linear_producer(data, node)
                vector = self._per_channel(constant, linear, other)
            except _Skip as reason:
                logger.info("%s not folded: %s", describe(node), reason)
                return
            if node.op_type == "Mul":
                affine = _Affine(node, data, vector, None, (other,))
            else:
                affine = _Affine(node, data, None, vector, (other,))
            self._fold(linear, affine)
            self.folded_affine += 1
            return

    def _biased_matmul(self, add: ir.Node) -> ir.Node | None:
        """The MatMul of ``Add(MatMul(a, B), constant)``, else None."""
        if add.domain != "" or add.op_type != "Add" or len(add.inputs) != 2 or None in add.inputs:
            return None
        for index in (0, 1):
            source = add.inputs[index].producer()
            if source is not None and source.domain == "" and source.op_type == "MatMul":
                if self.constant(add.inputs[1 - index]) is not None:
                    return source
        return None

    # ---- matching ---------------------------------------------------------

    def _batchnorm_statistics(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, shift)`` of an inference-mode BatchNormalization with constant statistics."""
        if node.attributes.get_int("training_mode", 0):
            raise _Skip("it is in training mode (training_mode=1)")
        for extra in node.outputs[1:]:
            if extra.uses() or extra.is_graph_output():
                raise _Skip(f"its running-statistics output '{extra.name}' is used (training mode)")
        if not node.attributes.get_int("spatial", 1):
            raise _Skip("it has spatial=0 (per-activation statistics, not per channel)")
        if len(node.inputs) != 5 or node.inputs[0] is None:
            raise _Skip(f"it has {len(node.inputs)} inputs, not 5")
        arrays = []
        for role, value in zip(_BN_INPUTS, node.inputs[1:], strict=True):
            array = self.constant(value)
            if array is None:
                raise _Skip(f"its {role} '{value_name(value)}' is not a constant")
            if not np.issubdtype(array.dtype, np.floating):
                raise _Skip(f"its {role} '{value_name(value)}' is {array.dtype}, not floating point")
            arrays.append(array)
        gamma, beta, running_mean, running_var = arrays
        shapes = {array.shape for array in arrays}
        if len(shapes) != 1 or len(arrays[0].shape) != 1:
            listed = ", ".join(_shape_text(array.shape) for array in arrays)
            raise _Skip(f"its statistics have the shapes {listed}, not one (C,)")
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        return batchnorm_scale_shift(running_mean, running_var, gamma, beta, epsilon)

    def _linear_producer(self, data: ir.Value, consumer: ir.Node) -> _Linear:
        """The linear layer whose only consumer is ``consumer`` (reading ``data``), or _Skip."""
        if data.is_graph_input():
            raise _Skip(f"its input is a graph input, not {_LINEAR_NAMES}")
        producer = data.producer()
        if producer is None:
            raise _Skip(f"its input '{value_name(data)}' is a constant, not the output of {_LINEAR_NAMES}")
        bias_node = None
        if (matmul := self._biased_matmul(producer)) is not None:
            bias_node, producer = producer, matmul
        if producer.domain != "" or producer.op_type not in _LINEAR_OPS:
            raise _Skip(f"its input comes from {describe(producer)}, not {_LINEAR_NAMES}")
        self._check_only_consumer(data, consumer, bias_node or producer)
        if bias_node is not None:
            self._check_only_consumer(producer.outputs[0], bias_node, producer)
        weight = self.constant(input_at(producer, 1))
        if weight is None:
            raise _Skip(f"the weight of {describe(producer)} is not a constant")
        if not np.issubdtype(weight.dtype, np.floating):
            raise _Skip(f"the weight of {describe(producer)} is {weight.dtype}, not floating point")
        op = producer.op_type
        if op == "MatMul":
            return self._matmul(producer, bias_node, data, weight)
        bias_value = input_at(producer, 2)
        bias = self.constant(bias_value)
        if bias_value is not None and bias is None:
            raise _Skip(f"the bias of {describe(producer)} is not a constant")
        if op == "Conv":
            return _Linear(producer, data, weight, bias, weight.shape[0], weight.ndim, 1)
        if op == "ConvTranspose":
            groups = producer.attributes.get_int("group", 1)
            if weight.shape[0] % groups:
                raise _Skip(
                    f"{describe(producer)} has {weight.shape[0]} input channels, not divisible by group={groups}"
                )
            return _Linear(producer, data, weight, bias, weight.shape[1] * groups, weight.ndim, 1)
        # Gemm: Y = alpha * A' B' + beta * C, channels on axis 1 of the (M, N) output.
        if weight.ndim != 2:
            raise _Skip(f"the weight of {describe(producer)} has rank {weight.ndim}, not 2")
        channels = weight.shape[0] if producer.attributes.get_int("transB", 0) else weight.shape[1]
        if bias is not None:
            bias = bias.astype(np.float64) * producer.attributes.get_float("beta", 1.0)
        return _Linear(producer, data, weight, bias, channels, 2, 1)

    def _matmul(self, node: ir.Node, bias_node: ir.Node | None, data: ir.Value, weight: np.ndarray) -> _Linear:
        """MatMul(a, B) with B (K, N): channels on the output's last axis, any rank of ``a``."""
        if weight.ndim != 2:
            raise _Skip(f"the weight of {describe(node)} has rank {weight.ndim}, not 2")
        rank = _rank(node.outputs[0])
        if rank is None and (input_rank := _rank(node.inputs[0])) is not None:
            rank = input_rank if input_rank >= 2 else 1
        linear = _Linear(node, data, weight, None, weight.shape[1], rank, -1)
        if bias_node is not None:
            linear.bias_node = bias_node
            linear.bias_index = 1 if bias_node.inputs[0] is node.outputs[0] else 0
            bias_value = bias_node.inputs[linear.bias_index]
            bias = self.constant(bias_value)
            try:
                if bias is None:
                    raise _Skip("it is not a constant")
                self._per_channel(bias, linear, bias_value)
            except _Skip:
                raise _Skip(f"the bias of {describe(node)} ({describe(bias_node)}) is not per output column") from None
            linear.bias = bias
        return linear

    def _check_only_consumer(self, value: ir.Value, consumer: ir.Node, producer: ir.Node) -> None:
        if value.is_graph_output():
            raise _Skip(f"the output of {describe(producer)} is also a graph output")
        others = list(dict.fromkeys(use.node for use in value.uses() if use.node is not consumer))
        if others:
            listed = ", ".join(describe(node) for node in others)
            raise _Skip(f"the output of {describe(producer)} has other consumers ({listed})")
        if len(value.uses()) != 1:
            raise _Skip(f"{describe(consumer)} reads the output of {describe(producer)} twice")

    def _check_batchnorm_channels(self, linear: _Linear, affine: _Affine) -> None:
        """A BatchNormalization normalises axis 1: it must be the layer's channel axis, of the same size."""
        if linear.node.op_type == "MatMul" and linear.rank != 2:
            shape = "of unknown rank" if linear.rank is None else f"of rank {linear.rank}"
            raise _Skip(
                f"{describe(linear.node)} gives an output {shape}: BatchNormalization normalises axis 1, "
                "the MatMul's output channels are its last axis"
            )
        length = affine.scale.shape[0]
        if length != linear.channels:
            raise _Skip(
                f"{describe(linear.node)} has {linear.channels} output channels but the BatchNormalization has {length}"
            )

    def _per_channel(self, constant: np.ndarray, linear: _Linear, value: ir.Value) -> np.ndarray:
        """The (C,) float64 vector of a constant that broadcasts along the channel axis only."""
        channels, rank = linear.channels, linear.rank
        shape = constant.shape
        if constant.size == 1 and (rank is None and constant.ndim <= 1 or rank is not None and constant.ndim <= rank):
            return np.full(channels, float(constant.reshape(-1)[0]))
        if rank is None:
            fits = constant.ndim == 1 and shape[0] == channels  # a MatMul output of unknown rank: last axis only
        else:
            axis = linear.channel_axis % rank
            aligned = (1,) * (rank - constant.ndim) + tuple(shape)
            fits = constant.ndim <= rank and all(
                dim == 1 or (index == axis and dim == channels) for index, dim in enumerate(aligned)
            )
        if not fits or constant.size != channels:
            where = "its last axis" if rank is None or linear.channel_axis == -1 else f"axis {linear.channel_axis}"
            output = "output" if rank is None else f"rank-{rank} output"
            raise _Skip(
                f"its constant '{value_name(value)}' of shape {_shape_text(shape)} is not per channel along "
                f"{where} of the {output} of {describe(linear.node)} ({channels} channels)"
            )
        return constant.astype(np.float64).reshape(channels)

    # ---- rewriting --------------------------------------------------------

    def _fold(self, linear: _Linear, affine: _Affine) -> None:
        """Rewrite ``affine(linear(x))`` as ``linear'(x)``: new weight and bias, the affine node gone."""
        node, op = linear.node, linear.node.op_type
        weight = None
        if affine.scale is not None:
            if op == "ConvTranspose":
                weight = scale_transposed_conv_weight(linear.weight, affine.scale, node.attributes.get_int("group", 1))
            else:
                weight = scale_output_channels(linear.weight, affine.scale, _weight_channel_axis(node))
        bias = fold_bias(linear.bias, affine.scale, affine.shift)
        if bias is not None:
            bias = bias.astype(linear.weight.dtype)
        # The bias first: its constant subgraph may read the old weight (e.g. Shape(W)), which
        # then dies with it, and the new weight can take the old weight's name.
        if bias is not None:
            if op == "Gemm":
                node.attributes.pop("beta", None)  # beta * C is folded into the new C
            if op != "MatMul":
                base = None if len(node.inputs) > 2 and node.inputs[2] is not None else f"{node.name or op}_bias"
                self.edit.set_input(node, 2, bias, base)
            elif linear.bias_node is not None:
                self.edit.set_input(linear.bias_node, linear.bias_index, bias)
            else:
                self._add_matmul_bias(linear, bias)
        if weight is not None:
            self.edit.set_input(node, 1, weight)
        self.edit.replace_node(affine.node, linear.output)
        for value in affine.parameters:
            self.edit.drop_if_dead(value)
        self.modified = True
        logger.debug("%s folded into %s", describe(affine.node), describe(node))

    def _add_matmul_bias(self, linear: _Linear, bias: np.ndarray) -> None:
        bias_value = self.edit.new_initializer(bias, f"{value_name(linear.node.inputs[1])}_bias")
        add = ir.Node("", "Add", [linear.output, bias_value], name=self.edit.unique(f"{linear.node.name or 'MatMul'}_bias"))
        add.outputs[0].name = self.edit.unique(f"{value_name(linear.output)}_biased")
        add.outputs[0].shape = linear.output.shape
        add.outputs[0].type = linear.output.type
        self.graph.insert_after(linear.node, add)
        linear.output = add.outputs[0]

    def _lower(self, affine: _Affine) -> bool:
        """BatchNormalization -> Mul(x, scale) -> Add(shift), with (C, 1, ...) constants; False if the rank is unknown."""
        rank = self._propagated_rank(affine.data)
        if rank is None or rank < 2:
            return False
        node = affine.node
        dtype = affine.data.dtype.numpy() if affine.data.dtype is not None else np.dtype(np.float32)
        shape = (-1,) + (1,) * (rank - 2)
        base = node.name or value_name(node.outputs[0])
        scale = self.edit.new_initializer(affine.scale.reshape(shape).astype(dtype), f"{base}_scale")
        shift = self.edit.new_initializer(affine.shift.reshape(shape).astype(dtype), f"{base}_shift")
        mul = ir.Node("", "Mul", [affine.data, scale], name=self.edit.unique(f"{base}_mul"))
        add = ir.Node("", "Add", [mul.outputs[0], shift], name=self.edit.unique(f"{base}_add"))
        mul.outputs[0].name = self.edit.unique(f"{base}_scaled")
        for value in (mul.outputs[0], add.outputs[0]):
            value.shape = node.outputs[0].shape
            value.type = node.outputs[0].type
        self.graph.insert_after(node, [mul, add])
        self.edit.replace_node(node, add.outputs[0])
        for value in affine.parameters:
            self.edit.drop_if_dead(value)
        self.lowered += 1
        self.modified = True
        return True

    def _propagated_rank(self, value: ir.Value | None) -> int | None:
        """``value``'s rank from its shape, a constant, or its producers through rank-preserving ops (memoised)."""
        if value is None:
            return None
        if value in self.ranks:
            return self.ranks[value]
        path = []
        rank = None
        while value is not None and value not in self.ranks:
            path.append(value)
            if (rank := _rank(value)) is not None:
                break
            if (constant := self.constant(value)) is not None:
                rank = constant.ndim
                break
            producer = value.producer()
            if producer is None or producer.domain != "" or not producer.inputs:
                break
            if producer.op_type in _BROADCAST_OPS:
                ranks = [self._propagated_rank(item) for item in producer.inputs if item is not None]
                rank = None if not ranks or None in ranks else max(ranks)
                break
            if producer.op_type not in _SAME_RANK_OPS:
                break
            value = producer.inputs[0]
        else:
            rank = self.ranks.get(value) if value is not None else None
        for item in path:
            self.ranks[item] = rank
        return rank


def _weight_channel_axis(node: ir.Node) -> int:
    """The output-channel axis of the weight (input 1) of a Conv, Gemm or MatMul."""
    if node.op_type == "Conv":
        return 0  # (C_out, C_in / group, k...)
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1  # (N, K) or (K, N)
    return -1  # MatMul: (K, N)


# Ops whose output rank is their first input's rank, and ops broadcasting all inputs:
# enough to find the rank of a BatchNormalization input in an unshaped CNN graph.
_SAME_RANK_OPS = frozenset(
    {
        "Abs", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Conv", "ConvTranspose", "Dropout",
        "Elu", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization",
        "LRN", "LeakyRelu", "LpPool", "MaxPool", "Neg", "Pad", "PRelu", "Relu", "Resize", "Selu", "Sigmoid",
        "Softmax", "Softplus", "Sqrt", "Tanh", "Upsample",
    }
)  # fmt: skip
_BROADCAST_OPS = frozenset({"Add", "Div", "Max", "Mean", "Min", "Mul", "Pow", "Sub", "Sum"})


def _rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)
