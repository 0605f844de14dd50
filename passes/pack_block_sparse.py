"""1xN block-sparse pruning and packing (Lin et al., "1xN Pattern for Pruning CNNs", arXiv 2105.14713).

A Conv weight ``W`` (``C_out x C_in x kh x kw``, group 1) or a Gemm weight
(``C_out x K`` after ``transB`` and ``alpha``) is cut into blocks of ``n``
consecutive output channels at one input channel::

    block (b, c) = W[b*n:(b+1)*n, c, ...]               b < C_out / n, c < C_in
    norm (b, c)  = sum |W[b*n:(b+1)*n, c, ...]|          (L1 over the n x kh x kw values)

Pruning: the ``floor(sparsity * B * C_in)`` blocks of smallest norm are
set to zero (ties: lower flat index first, as ``argsort(kind="stable")``).

Filter rearrangement (done first): output channels are reordered so that
the filters sharing a block also share the input channels the block keeps.
Three orders are tried and the one whose kept blocks hold the most L1 mass
wins (``rearrangement``; the identity on a tie, so a rearranged layer never
keeps less of its weight than the same layer unpermuted):

- the identity;
- the paper's (Sec. 3.3), by filter norm, largest first:
  ``argsort(-||W[o]||_1, stable)`` (``filter_order``);
- filters grouped greedily by the input channels they rely on
  (``group_order``): the strongest free filter opens a group, then the free
  filter with the most mass on the group's ``(1 - sparsity) * C_in``
  strongest input channels joins, until the group holds ``n``.

On the digits CNN (bench/blocksparse.py --parts accuracy, 20 seeds, fine-tuned),
the norm order alone was -1.3 +- 1.2 points against no rearrangement at
70% sparsity; choosing by kept mass, +0.3 +- 0.5. Then::

    W' = W[perm],  b' = b[perm]

The layer's output channel ``i`` is then the old channel ``perm[i]``: the
permutation is compensated exactly by permuting, with ``perm``, everything
that reads those channels up to the next layers that contract over them --
BatchNormalization statistics, per-channel constants of Mul/Add/Sub/Div,
depthwise Conv filters (channel ``c*m + i`` of a multiplier-``m`` depthwise
conv moves with ``c``), and the input channels of the next Conv (``W[:,
perm]``), Gemm or MatMul (rows / columns of ``B``; after a ``Flatten`` of a
``C x H x W`` map, feature ``c*HW + s``). Element-wise activations and
pooling carry the permutation unchanged. The function is unchanged by the
permutation (float rounding aside: the same products are summed, in another
order). When a channel reaches anything else -- a graph output, a residual
``Add`` of two computed tensors, a ``Concat``, a ``Reshape`` -- the layer is
not rearranged (INFO log with the reason) and is pruned in its own order.

Weights already sparse from training: a layer with all-zero blocks is taken
as trained with its mask (zeros). It is never rearranged (that would scatter
its blocks) and never pruned beyond ``sparsity``: all-zero blocks are the
smallest, so they are the first to go, and when they reach
``floor(sparsity * B * C_in)`` no non-zero block is pruned. All-zero blocks
are never stored.

Epilogue (``pack=true``): a BatchNormalization (inference mode, constant
statistics) and then a Relu or a Clip with constant bounds that follow the
layer alone are absorbed into the packed op::

    scale = gamma / sqrt(var + eps)      W_eff = W * scale (per output channel)
    shift = beta - mean * scale          b_eff = b * scale + shift

The norms, the rearrangement and the pruning are computed on ``W_eff``, the
weights as they act on the output, so ``pack=false`` (masked dense output,
below) makes the same choices.

Packing (``pack=true``): the layer becomes ``edgec.BlockSparseConv`` /
``edgec.BlockSparseGemm`` (see edgec/ops) with initializers ``values``
(``nnz x n x kh x kw`` / ``nnz x n``), ``indices`` (int32, the input channel
of each kept block), ``indptr`` (int32, ``C_out/n + 1`` row pointers) and
``bias``. With ``pack=false`` the layers stay standard Conv / Gemm with the
rearranged, pruned (zeroed) weights: the masked dense model, which ONNX
Runtime runs, and against which the packed model is checked.

A node is left as it is, with an INFO log line giving the reason, when: it is
not a Conv/Gemm, its layer kind is not in ``kinds`` or its name not in
``layers``; a weight or bias is not constant; the Conv is grouped
(depthwise: a block of n output channels would span n groups), not 2-D, or
has ``auto_pad`` SAME_*; ``C_out`` is not a multiple of ``n``; the Gemm has
``transA=1`` or a bias that is not per output feature; or no block is left to
drop (``sparsity`` 0 on a layer without all-zero blocks).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from edgec.passes.block_sparsity import BlockSparsity, block_norms, block_sparsify, element_mask, pack_blocks
from edgec.passes.channel_ops import ELEMENTWISE, POOLS, UNARY
from edgec.passes.constants import Constants
from edgec.passes.graph_edit import GraphEditor, describe, input_at
from edgec.passes.options import BLOCK_SPARSE_LAYER, option_help, require_float_graph, require_node_names

logger = logging.getLogger(__name__)

__all__ = ["PackBlockSparsePass"]  # the math (block_norms, pack_blocks, ...) is passes/block_sparsity.py


# --------------------------------------------------------------------------
# The pass: graph plumbing only.
# --------------------------------------------------------------------------

_KINDS = ("pointwise", "conv", "gemm")
# What carries channels unchanged: the channel analysis's tables (passes/channel_ops.py), one list for
# the passes that follow channels.
_PASSTHROUGH = frozenset(UNARY) | POOLS
_ELEMENTWISE = frozenset(ELEMENTWISE)


@dataclasses.dataclass(frozen=True)
class PackBlockSparsePass(ir.passes.InPlacePass):
    """Prune Conv/Gemm weights to 1xN blocks (after a filter rearrangement) and pack them
    into edgec.BlockSparseConv / edgec.BlockSparseGemm; see the module docstring."""

    cli_name: ClassVar[str] = "block-sparse"

    n: int = dataclasses.field(
        default=4,
        metadata=option_help(
            "block size: output channels per block (the paper's N); the kernels are fastest when it is "
            "the target's float lanes: 4 NEON, 8 AVX2, 16 AVX-512"
        ),
    )
    sparsity: float = dataclasses.field(
        default=0.5,
        metadata=option_help("fraction of blocks pruned per layer, smallest L1 norm first (0: only all-zero blocks)"),
    )
    rearrange: bool = dataclasses.field(
        default=True,
        metadata=option_help(
            "reorder output channels first (per layer, whichever of filter-norm order, grouping by shared "
            "input channels or none keeps the most weight), compensated downstream"
        ),
    )
    layers: tuple[str, ...] = dataclasses.field(
        default=(), metadata=option_help("only these Conv/Gemm node names (default: every eligible layer)")
    )
    kinds: tuple[str, ...] = dataclasses.field(
        default=_KINDS, metadata=option_help("layer kinds to pack: pointwise (1x1 conv), conv (kxk), gemm")
    )
    pack: bool = dataclasses.field(
        default=True,
        metadata=option_help("false: keep dense Conv/Gemm with pruned, rearranged weights (the masked dense model)"),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive int, not {self.n!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), not {self.sparsity!r}")
        unknown = sorted(set(self.kinds) - set(_KINDS))
        if unknown:
            raise ValueError(f"unknown layer kind(s) {', '.join(unknown)}; choose from {', '.join(_KINDS)}")

    def requires(self, model: ir.Model) -> None:
        require_float_graph(model, self.cli_name)
        require_node_names(model, self.layers, "layers", self.cli_name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rewriter = _Rewriter(model, self)
        for node in list(model.graph):
            if node.graph is model.graph and node.domain == "" and node.op_type in ("Conv", "Gemm"):
                rewriter.visit(node)
        if rewriter.candidates:
            logger.info(
                "block-sparse: %s %d of %d Conv/Gemm layer(s) at n=%d (%d rearranged); blocks kept %d of %d",
                "packed" if self.pack else "pruned",
                rewriter.packed,
                rewriter.candidates,
                self.n,
                rewriter.rearranged,
                rewriter.kept_blocks,
                rewriter.total_blocks,
            )
        return ir.passes.PassResult(model, modified=rewriter.packed > 0)


# --------------------------------------------------------------------------
# Working state of one call (a local of PackBlockSparsePass.call).
# --------------------------------------------------------------------------


class _Skip(Exception):
    """A match that is left as it is; the message is the reason."""


@dataclasses.dataclass
class _Layer:
    """A matched Conv/Gemm: its weight as (C_out, C_in, ...) with alpha applied, and its epilogue."""

    node: ir.Node
    kind: str
    weight: np.ndarray
    bias: np.ndarray | None
    batchnorm: ir.Node | None = None
    scale: np.ndarray | None = None  # float64 (C_out,)
    shift: np.ndarray | None = None
    activation: ir.Node | None = None
    activation_kind: str = "none"
    bounds: tuple[float, float] = (float("-inf"), float("inf"))

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def effective(self) -> tuple[np.ndarray, np.ndarray]:
        """(W_eff, b_eff) with the batch norm folded in; float32."""
        bias = np.zeros(self.out_channels) if self.bias is None else self.bias.astype(np.float64)
        weight = self.weight.astype(np.float64)
        if self.scale is not None:
            weight = weight * self.scale.reshape((-1,) + (1,) * (weight.ndim - 1))
            bias = bias * self.scale + self.shift
        return weight.astype(np.float32), bias.astype(np.float32)

    def nodes(self) -> list[ir.Node]:
        return [node for node in (self.node, self.batchnorm, self.activation) if node is not None]

    def output(self) -> ir.Value:
        return self.nodes()[-1].outputs[0]


class _Rewriter:
    def __init__(self, model: ir.Model, config: PackBlockSparsePass) -> None:
        self.graph = model.graph
        self.config = config
        self.edit = GraphEditor(model)
        self.constant = Constants(model)
        self.candidates = self.packed = self.rearranged = self.kept_blocks = self.total_blocks = 0

    # ---- one layer --------------------------------------------------------

    def visit(self, node: ir.Node) -> None:
        self.candidates += 1
        try:
            layer = self._match(node)
            if self.config.pack:
                self._match_epilogue(layer)
            else:
                self._match_batchnorm(layer)  # same pruning choices as the packed model; nothing absorbed
        except _Skip as reason:
            logger.info("%s not packed: %s", describe(node), reason)
            return
        n = self.config.n
        weight, _ = layer.effective()
        decision = block_sparsify(weight, n, self.config.sparsity, self.config.rearrange)
        if decision.trained:
            logger.info(
                "%s: weights already %.0f%% block-sparse (all-zero blocks): taken as trained, not rearranged",
                describe(node), 100 * float(np.mean(block_norms(weight, n) == 0)),
            )  # fmt: skip
        if decision.keep.all():
            logger.info("%s not packed: no block to drop (sparsity=%g, no all-zero block)", describe(node), self.config.sparsity)
            return
        actions: list[Callable[[], None]] = []
        perm = decision.perm
        if self.config.rearrange and not decision.trained and not np.array_equal(perm, np.arange(perm.size)):
            start = layer.output() if self.config.pack else node.outputs[0]
            try:
                actions = self._follow(start, perm)
            except _Skip as reason:
                logger.info("%s not rearranged: %s", describe(node), reason)
                decision = block_sparsify(weight, n, self.config.sparsity, rearrange=False)
                perm = decision.perm
        for action in actions:
            action()
        if actions:
            self.rearranged += 1
        if self.config.pack:
            self._pack(layer, decision)
        else:
            self._mask(layer, decision)
        self.packed += 1
        self.kept_blocks += int(np.count_nonzero(decision.keep))
        self.total_blocks += decision.keep.size
        logger.info(
            "%s: %d of %d blocks of 1x%d kept (%.0f%% sparse)%s",
            describe(node), np.count_nonzero(decision.keep), decision.keep.size, n, 100 * decision.sparsity,
            ", rearranged" if actions else "",
        )  # fmt: skip

    # ---- matching ---------------------------------------------------------

    def _match(self, node: ir.Node) -> _Layer:
        config = self.config
        if config.layers and node.name not in config.layers:
            raise _Skip(f"not in layers={'+'.join(config.layers)}")
        if node.op_type == "Conv":
            layer = self._match_conv(node)
        else:
            layer = self._match_gemm(node)
        if layer.kind not in config.kinds:
            raise _Skip(f"a {layer.kind} layer, and kinds={'+'.join(config.kinds)}")
        if layer.out_channels % config.n:
            raise _Skip(f"{layer.out_channels} output channels are not a multiple of n={config.n}")
        return layer

    def _match_conv(self, node: ir.Node) -> _Layer:
        if len(node.inputs) < 2 or node.inputs[1] is None:
            raise _Skip("no weight input")
        weight = self.constant(node.inputs[1])
        if weight is None:
            raise _Skip(f"its weight '{node.inputs[1].name}' is not a constant")
        if weight.ndim != 4:
            raise _Skip(f"a {weight.ndim - 2}-D convolution; only 2-D convolutions are packed")
        group = node.attributes.get_int("group", 1)
        if group != 1:
            raise _Skip(
                f"grouped convolution (group={group}): a block of output channels would span several groups "
                "(depthwise convs stay dense)"
            )
        auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "VALID"):
            raise _Skip(f"auto_pad={auto_pad}; export with explicit pads")
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = self.constant(node.inputs[2])
            if bias is None:
                raise _Skip(f"its bias '{node.inputs[2].name}' is not a constant")
        if weight.dtype != np.float32:
            raise _Skip(f"weight dtype {weight.dtype}; only float32 is packed")
        kind = "pointwise" if weight.shape[2:] == (1, 1) else "conv"
        return _Layer(node, kind, weight, None if bias is None else bias.reshape(-1))

    def _match_gemm(self, node: ir.Node) -> _Layer:
        if node.attributes.get_int("transA", 0):
            raise _Skip("transA=1 (the input is transposed)")
        weight = self.constant(input_at(node, 1))
        if weight is None:
            raise _Skip("its B is not a constant")
        if weight.ndim != 2 or weight.dtype != np.float32:
            raise _Skip(f"B of shape {weight.shape} and dtype {weight.dtype}; a float32 matrix is packed")
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        matrix = weight if node.attributes.get_int("transB", 0) else weight.T
        matrix = (matrix.astype(np.float64) * alpha).astype(np.float32)
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = self.constant(node.inputs[2])
            if c is None:
                raise _Skip(f"its C '{node.inputs[2].name}' is not a constant")
            out_features = matrix.shape[0]
            if c.size == 1:
                bias = np.full(out_features, float(c.reshape(-1)[0]) * beta, dtype=np.float32)
            elif c.shape in ((out_features,), (1, out_features)):
                bias = (c.reshape(-1).astype(np.float64) * beta).astype(np.float32)
            else:
                raise _Skip(f"its C of shape {c.shape} is not per output feature")
        return _Layer(node, "gemm", matrix, bias)

    def _sole_consumer(self, value: ir.Value) -> ir.Node | None:
        if value.is_graph_output():
            return None
        uses = value.uses()
        if len(uses) != 1 or uses[0].idx != 0:
            return None
        consumer = uses[0].node
        return consumer if consumer.graph is self.graph and consumer.domain == "" else None

    def _match_batchnorm(self, layer: _Layer) -> None:
        consumer = self._sole_consumer(layer.node.outputs[0])
        if consumer is None or consumer.op_type != "BatchNormalization":
            return
        if any(output.uses() or output.is_graph_output() for output in consumer.outputs[1:]):
            logger.info("%s not absorbed: training-mode outputs are used", describe(consumer))
            return
        if consumer.attributes.get_int("training_mode", 0):
            logger.info("%s not absorbed: training_mode=1", describe(consumer))
            return
        arrays = [self.constant(value) for value in consumer.inputs[1:5]]
        if len(arrays) != 4 or any(array is None or array.size != layer.out_channels for array in arrays):
            logger.info("%s not absorbed: its statistics are not constant per-channel vectors", describe(consumer))
            return
        gamma, beta, mean, var = (array.reshape(-1).astype(np.float64) for array in arrays)
        epsilon = consumer.attributes.get_float("epsilon", 1e-5)
        layer.batchnorm = consumer
        layer.scale = gamma / np.sqrt(var + epsilon)
        layer.shift = beta - mean * layer.scale

    def _match_epilogue(self, layer: _Layer) -> None:
        """BatchNormalization, then Relu or Clip, consumed by nothing else: absorbed into the packed op."""
        self._match_batchnorm(layer)
        consumer = self._sole_consumer(layer.output())
        if consumer is None:
            return
        if consumer.op_type == "Relu":
            layer.activation, layer.activation_kind = consumer, "Relu"
        elif consumer.op_type == "Clip":
            bounds = self._clip_bounds(consumer)
            if bounds is None:
                logger.info("%s not absorbed: its bounds are not constant scalars", describe(consumer))
                return
            layer.activation, layer.activation_kind, layer.bounds = consumer, "Clip", bounds

    def _clip_bounds(self, node: ir.Node) -> tuple[float, float] | None:
        if "min" in node.attributes or "max" in node.attributes:  # opset < 11
            return node.attributes.get_float("min", float("-inf")), node.attributes.get_float("max", float("inf"))
        bounds = [float("-inf"), float("inf")]
        for index in (1, 2):
            if index < len(node.inputs) and node.inputs[index] is not None:
                array = self.constant(node.inputs[index])
                if array is None or array.size != 1:
                    return None
                bounds[index - 1] = float(array.reshape(-1)[0])
        return bounds[0], bounds[1]

    # ---- following the permuted channels ----------------------------------

    def _follow(self, start: ir.Value, perm: np.ndarray) -> list[Callable[[], None]]:
        """Actions that permute every reader of ``start``'s channels (axis 1) with ``perm``; _Skip if one cannot."""
        actions: list[Callable[[], None]] = []
        pending: list[tuple[ir.Value, np.ndarray]] = [(start, perm)]
        seen: set[int] = set()
        while pending:
            value, order = pending.pop()
            if value.is_graph_output():
                raise _Skip(f"its channels reach the graph output '{value.name}'")
            for use in value.uses():
                node, index = use.node, use.idx
                if id(node) in seen:
                    raise _Skip(f"{describe(node)} reads the permuted channels twice")
                seen.add(id(node))
                if node.graph is not self.graph or node.domain != "":
                    raise _Skip(f"its channels reach {describe(node)}, which the pass does not follow")
                pending.extend(self._follow_node(node, index, order, actions))
        return actions

    def _follow_node(self, node: ir.Node, index: int, order: np.ndarray, actions: list) -> list[tuple[ir.Value, np.ndarray]]:
        op = node.op_type
        if op in _PASSTHROUGH and index == 0:
            return [(node.outputs[0], order)]
        if op == "BatchNormalization" and index == 0:
            if any(output.uses() or output.is_graph_output() for output in node.outputs[1:]):
                raise _Skip(f"{describe(node)} is in training mode")
            for position in range(1, 5):
                self._plan_permute(node, position, order, 0, actions)
            return [(node.outputs[0], order)]
        if op == "Conv" and index == 0:
            return self._follow_conv(node, order, actions)
        if op == "Gemm" and index == 0:
            if node.attributes.get_int("transA", 0):
                raise _Skip(f"{describe(node)} has transA=1")
            axis = 1 if node.attributes.get_int("transB", 0) else 0
            self._plan_permute(node, 1, order, axis, actions)
            return []
        if op == "MatMul" and index == 0:
            weight = self.constant(node.inputs[1])
            if weight is None or weight.ndim != 2:
                raise _Skip(f"{describe(node)} has no constant 2-D weight")
            self._plan_permute(node, 1, order, 0, actions)
            return []
        if op == "Flatten" and index == 0:
            return [(node.outputs[0], self._flatten_order(node, order))]
        if op in _ELEMENTWISE:
            other = node.inputs[1 - index] if len(node.inputs) == 2 else None
            constant = self.constant(other)
            if constant is None:
                raise _Skip(f"its channels meet another computed tensor in {describe(node)} (a residual connection)")
            if constant.size > 1:
                rank = len(node.inputs[index].shape) if node.inputs[index].shape is not None else None
                if rank is None or constant.ndim > rank:
                    raise _Skip(f"{describe(node)}: cannot tell which axis its constant broadcasts on")
                aligned = (1,) * (rank - constant.ndim) + constant.shape
                if any(dim != 1 for axis, dim in enumerate(aligned) if axis != 1) or aligned[1] != order.size:
                    raise _Skip(f"{describe(node)}: its constant of shape {constant.shape} is not per channel")
                self._plan_permute(node, 1 - index, order, 1 - (rank - constant.ndim), actions)
            return [(node.outputs[0], order)]
        raise _Skip(f"its channels reach {describe(node)}, which the pass does not follow")

    def _follow_conv(self, node: ir.Node, order: np.ndarray, actions: list) -> list[tuple[ir.Value, np.ndarray]]:
        weight = self.constant(input_at(node, 1))
        if weight is None:
            raise _Skip(f"{describe(node)} has no constant weight")
        group = node.attributes.get_int("group", 1)
        if group == 1:
            self._plan_permute(node, 1, order, 1, actions)  # the next layer's input channels
            return []
        if group == order.size and weight.shape[1] == 1:  # depthwise, channel multiplier m
            multiplier = weight.shape[0] // group
            out_order = (order[:, None] * multiplier + np.arange(multiplier)).reshape(-1)
            self._plan_permute(node, 1, out_order, 0, actions)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                self._plan_permute(node, 2, out_order, 0, actions)
            return [(node.outputs[0], out_order)]
        raise _Skip(f"{describe(node)} is a grouped convolution (group={group})")

    def _flatten_order(self, node: ir.Node, order: np.ndarray) -> np.ndarray:
        """Feature ``c * HW + s`` of ``Flatten(axis=1)`` moves with channel ``c``."""
        source = node.inputs[0]
        producer = source.producer()
        shape = source.shape
        if node.attributes.get_int("axis", 1) != 1:
            raise _Skip(f"{describe(node)} flattens from axis {node.attributes.get_int('axis', 1)}, not 1")
        if producer is not None and producer.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
            spatial = 1
        elif shape is not None and all(isinstance(dim, int) for dim in shape[2:]):
            spatial = math.prod(int(dim) for dim in shape[2:])
        else:
            raise _Skip(f"{describe(node)}: the spatial size of its input is unknown")
        return (order[:, None] * spatial + np.arange(spatial)).reshape(-1)

    def _plan_permute(self, node: ir.Node, index: int, order: np.ndarray, axis: int, actions: list) -> None:
        """Check now, permute later: ``node.inputs[index]`` taken along ``axis`` in ``order``."""
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None:
            return
        array = self.constant(value)
        if array is None:
            raise _Skip(f"input {index} of {describe(node)} is not constant")
        if array.ndim <= axis or array.shape[axis] != order.size:
            raise _Skip(f"input {index} of {describe(node)} has shape {array.shape}, not {order.size} along axis {axis}")
        actions.append(lambda: self.edit.set_input(node, index, np.take(array, order, axis=axis)))

    # ---- rewriting --------------------------------------------------------

    def _pack(self, layer: _Layer, decision: BlockSparsity) -> None:
        n = self.config.n
        weight, bias = layer.effective()
        weight, bias = weight[decision.perm], bias[decision.perm]
        values, indices, indptr = pack_blocks(weight, decision.keep, n)
        node = layer.node
        base = node.name or node.outputs[0].name or "layer"
        inputs = [
            node.inputs[0],
            self.edit.new_initializer(values, f"{base}_values"),
            self.edit.new_initializer(indices, f"{base}_indices"),
            self.edit.new_initializer(indptr, f"{base}_indptr"),
            self.edit.new_initializer(bias, f"{base}_bias"),
        ]
        attributes = [ir.AttrInt64("block_size", n), ir.AttrString("activation", layer.activation_kind)]
        if layer.activation_kind == "Clip":
            attributes += [ir.AttrFloat32("activation_min", layer.bounds[0]), ir.AttrFloat32("activation_max", layer.bounds[1])]
        if layer.kind == "gemm":
            op_type = "BlockSparseGemm"
        else:
            op_type = "BlockSparseConv"
            kernel = list(weight.shape[2:])
            attributes += [
                ir.AttrInt64s("kernel_shape", kernel),
                ir.AttrInt64s("strides", list(node.attributes.get_ints("strides", [1, 1]))),
                ir.AttrInt64s("pads", list(node.attributes.get_ints("pads", [0, 0, 0, 0]))),
                ir.AttrInt64s("dilations", list(node.attributes.get_ints("dilations", [1, 1]))),
            ]
        from edgec.ops import DOMAIN, OPSET_VERSION

        packed = ir.Node(DOMAIN, op_type, inputs, attributes, name=self.edit.unique(f"{base}_block_sparse"))
        old_output = layer.output()
        packed.outputs[0].shape = old_output.shape
        packed.outputs[0].type = old_output.type
        self.graph.insert_before(node, packed)
        self.edit.replace_output(old_output, packed.outputs[0])
        dead_inputs = [value for old in layer.nodes() for value in old.inputs]
        self.edit.remove(layer.nodes())
        for value in dead_inputs:
            self.edit.drop_if_dead(value)
        self.graph.opset_imports.setdefault(DOMAIN, OPSET_VERSION)

    def _mask(self, layer: _Layer, decision: BlockSparsity) -> None:
        """The masked dense layer: ``W[perm] * mask`` and ``b[perm]`` in the node's own form.

        The weights are the raw ones (a batch norm after the layer stays, and
        ``_follow`` permuted its statistics); the mask is the one the packed
        op would get.
        """
        node, perm = layer.node, decision.perm
        node.metadata_props[BLOCK_SPARSE_LAYER] = f"1x{self.config.n}"  # quantize-int8 keeps it float, as the packed op
        weight = layer.weight[perm] * element_mask(decision.keep, self.config.n, layer.weight.shape)
        if layer.kind == "gemm":
            alpha = node.attributes.get_float("alpha", 1.0)
            matrix = (weight.astype(np.float64) / alpha).astype(np.float32)
            self.edit.set_input(node, 1, matrix if node.attributes.get_int("transB", 0) else matrix.T)
            c = self.constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if c is not None and c.size > 1:
                self.edit.set_input(node, 2, c.reshape(-1)[perm].reshape(c.shape))
        else:
            self.edit.set_input(node, 1, weight.astype(np.float32))
            if layer.bias is not None:
                self.edit.set_input(node, 2, layer.bias[perm])
