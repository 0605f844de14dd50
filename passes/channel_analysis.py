"""Channel-dependency analysis: what must be sliced with a Conv's output channels.

Shared by the passes that remove Conv output channels (fuse-filters,
zero-channels; the rewrite is passes/channel_rewrite.py). Every value
carries a layout -- the channel sets ("spaces") it holds along
axis 1, in order, and the columns per channel after a Flatten. A Conv (group
1, constant weight) opens a space. Layouts pass unchanged through
BatchNormalization (scale, B, mean, var sliced), element-wise activations
(Relu, Clip, LeakyRelu, HardSwish, Sigmoid, ...), MaxPool / AveragePool /
global pools / spatial ReduceMean, a depthwise Conv (weight, bias and
``group`` sliced together) and element-wise ops with a constant (a per-
channel constant is sliced). Concat on axis 1 lays spaces side by side
(channel offsets); Flatten / Reshape to (N, C*H*W) / Squeeze turn channels
into blocks of H*W columns. Consumers that end a space: a Conv of group 1
(weight axis 1 sliced), Gemm (the columns of B sliced) and MatMul with a
constant 2-D weight (its rows). An element-wise op of two non-constant
operands -- a residual Add -- ties their spaces: a tied group is pruned as
one, with one keep-set (fuse-filters: chosen from the summed importance of
its Convs, the smallest ratio of its members, every Conv fusing its own
filters; zero-channels: the channels removable in all of them).

A Conv is skipped, with an INFO log line naming it and the reason, when its
channels (or those of its tied group) reach a graph output (graph outputs
never change shape), reach an op the analysis does not follow (Resize,
Transpose, a grouped Conv, a Reshape other than a flatten, Concat on
another axis, ...), are tied to a graph input or to an excluded Conv,
or meet a non-constant weight or parameter. Only the main graph is rewritten
(edgec's frontend inlines functions); a value read inside a subgraph blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import onnx_ir as ir

from edgec.passes.channel_ops import ELEMENTWISE, POOLS, REDUCES, UNARY, apply_elementwise, zero_filters
from edgec.passes.constants import Constants
from edgec.passes.graph_edit import describe, input_at

logger = logging.getLogger(__name__)

__all__ = ["Blocked", "ChannelAnalysis", "Layout", "Sink", "node_name", "padded", "shrinkable_groups"]


def node_name(node: ir.Node) -> str:
    """The node's name, or its first output's (what ``exclude`` and ``layer_ratios`` match)."""
    return node.name or (node.outputs[0].name if node.outputs else "") or "?"


@dataclasses.dataclass(frozen=True)
class Layout:
    """The channels of a value along axis 1: spaces in order, and columns per channel (H*W after a Flatten)."""

    segments: tuple[tuple[int, int], ...]  # (space id, channels)
    rank: int
    block: int = 1

    @property
    def channels(self) -> int:
        return sum(length for _, length in self.segments)


@dataclasses.dataclass
class Space:
    origin: str  # "Conv 'c1'" or "graph input 'x'" ...
    channels: int
    source: ir.Node | None  # the Conv whose output channels these are; None for an opaque origin


@dataclasses.dataclass
class Group:
    """A union-find root's bookkeeping: why it cannot shrink, and which ops tied it together."""

    reasons: list[str] = dataclasses.field(default_factory=list)
    ties: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Sink:
    kind: Literal["conv", "gemm", "matmul"]
    node: ir.Node
    value: ir.Value  # the input that carries the channels


class ChannelAnalysis:
    """Layouts of every value reached by Conv channels, the ties between them, and what must be sliced.

    ``ChannelAnalysis(model, masked=...).run()``; ``masked``: also track the
    per-channel constant of every value (``constants``, NaN: not constant).
    """

    def __init__(self, model: ir.Model, *, masked: bool) -> None:
        self.graph = model.graph
        self.constant = Constants(model)
        self.masked = masked
        self.layouts: dict[ir.Value, Layout] = {}
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.groups: dict[int, Group] = {}
        self.sinks: list[Sink] = []
        self.depthwise: list[ir.Node] = []  # Convs sliced along their channels (input == output)
        self.batchnorms: list[ir.Node] = []
        self.constant_operands: list[tuple[ir.Node, int, ir.Value]] = []  # (node, input index, region value)
        self.reshapes: list[ir.Node] = []
        # masked mode: the per-channel constant of each value (NaN: not constant)
        self.constants: dict[ir.Value, np.ndarray] = {}

    # ---- union-find -------------------------------------------------------

    def new_space(self, origin: str, channels: int, source: ir.Node | None) -> int:
        self.spaces.append(Space(origin, channels, source))
        self.parent.append(len(self.parent))
        self.groups[len(self.parent) - 1] = Group()
        return len(self.parent) - 1

    def root(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, first: int, second: int, tie: str) -> None:
        a, b = self.root(first), self.root(second)
        if a == b:
            return
        self.parent[b] = a
        merged, other = self.groups[a], self.groups.pop(b)
        merged.reasons.extend(other.reasons)
        merged.ties.extend(other.ties)
        if tie not in merged.ties:
            merged.ties.append(tie)

    def block(self, layout: Layout, reason: str) -> None:
        for space, _ in layout.segments:
            group = self.groups[self.root(space)]
            if reason not in group.reasons:
                group.reasons.append(reason)

    def opaque(self, value: ir.Value, what: str) -> Layout | None:
        """A layout for a value that carries channels no Conv of ours produced (they cannot shrink)."""
        if value.shape is None or len(value.shape) < 2 or not isinstance(value.shape[1], int):
            return None
        layout = Layout(((self.new_space(what, value.shape[1], None), value.shape[1]),), len(value.shape))
        self.layouts[value] = layout
        if self.masked:
            self.constants[value] = np.full(value.shape[1], np.nan)
        return layout

    # ---- traversal --------------------------------------------------------

    def run(self) -> None:
        for value in self.graph.inputs:
            if not value.is_initializer():
                self.opaque(value, f"graph input '{value.name}'")
        position = {}
        for node in self.graph:
            position[node] = len(position)
            self.visit(node)
        for value in self.graph.outputs:
            if value in self.layouts:
                self.block(self.layouts[value], f"reach graph output '{value.name}' (graph outputs keep their shape)")
        for value, layout in self.layouts.items():
            producer = value.producer()
            for use in value.uses():
                if use.node.graph is not self.graph:
                    self.block(layout, f"are read inside a subgraph by {describe(use.node)}")
                elif producer is not None and position[use.node] < position[producer]:
                    # visited before the channels reached it: the graph is not topologically sorted
                    self.block(layout, f"are read by {describe(use.node)} before they are produced (unsorted graph)")

    def visit(self, node: ir.Node) -> None:
        region = [(index, value) for index, value in enumerate(node.inputs) if value is not None and value in self.layouts]
        if node.domain == "" and node.op_type == "Conv":
            self._conv(node, region)
            return
        if not region:
            return
        op = node.op_type if node.domain == "" else None
        try:
            if op == "BatchNormalization":
                self._batchnorm(node, region)
            elif op in UNARY:
                self._unary(node, region)
            elif op in POOLS:
                self._pool(node, region)
            elif op in REDUCES:
                self._reduce(node, region)
            elif op in ELEMENTWISE:
                self._elementwise(node, region)
            elif op == "Concat":
                self._concat(node, region)
            elif op in ("Flatten", "Reshape", "Squeeze"):
                self._flatten(node, region)
            elif op in ("Gemm", "MatMul"):
                self._dense(node, region)
            else:
                raise Blocked(f"are read by {describe(node)}, which the pass does not follow")
        except Blocked as reason:
            for _, value in region:
                self.block(self.layouts[value], str(reason))

    def _only_data_input(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> ir.Value:
        if [index for index, _ in region] != [0]:
            raise Blocked(f"are a parameter (not the data input) of {describe(node)}")
        for extra in node.outputs[1:]:
            if extra.uses() or extra.is_graph_output():
                raise Blocked(f"are read by {describe(node)}, whose extra output '{extra.name}' is used")
        return region[0][1]

    def _pass_through(self, node: ir.Node, value: ir.Value, function: Callable | None = None, rank: int | None = None):
        layout = self.layouts[value]
        if rank is not None and rank != layout.rank:
            layout = dataclasses.replace(layout, rank=rank)
        self.layouts[node.outputs[0]] = layout
        if self.masked:
            constants = self.constants[value]
            self.constants[node.outputs[0]] = (
                np.full_like(constants, np.nan) if function is None else apply_elementwise(function, constants)
            )

    # ---- the ops ----------------------------------------------------------

    def _conv(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        weight = self.constant(input_at(node, 1))
        bias_value = input_at(node, 2)
        bias = self.constant(bias_value)
        constant_parameters = weight is not None and weight.ndim >= 3 and (bias_value is None or bias is not None)
        group = node.attributes.get_int("group", 1)
        for index, value in region:
            layout = self.layouts[value]
            if index != 0:
                self.block(layout, f"are a parameter (not the data input) of {describe(node)}")
            elif not constant_parameters:
                self.block(layout, f"are read by {describe(node)}, whose weight or bias is not a constant")
            elif layout.block != 1 or layout.rank != weight.ndim:
                self.block(layout, f"reach {describe(node)} with a different rank")
            elif group == 1:
                self.sinks.append(Sink("conv", node, value))
            elif group == layout.channels and weight.shape[0] == group and weight.shape[1] == 1:
                self.depthwise.append(node)
                self._pass_through(node, value, None)
                if self.masked:
                    self.constants[node.outputs[0]] = self._depthwise_constants(node, weight, bias, self.constants[value])
                return  # a depthwise Conv's output channels are its input's: no new space
            else:
                self.block(layout, f"are read by grouped {describe(node)} (group={group}), which the pass does not slice")
        if group != 1 or not constant_parameters:
            return
        output = node.outputs[0]
        channels = weight.shape[0]
        space = self.new_space(describe(node), channels, node)
        self.layouts[output] = Layout(((space, channels),), weight.ndim)
        if self.masked:
            filter_constant = np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(channels)
            self.constants[output] = np.where(zero_filters(weight), filter_constant, np.nan)

    def _depthwise_constants(self, node: ir.Node, weight: np.ndarray, bias: np.ndarray | None, constants: np.ndarray):
        """kappa'_c = kappa_c * sum(w_c) + b_c without padding; with padding only kappa_c = 0 stays constant (= b_c)."""
        bias64 = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
        sums = weight.astype(np.float64).reshape(weight.shape[0], -1).sum(axis=1)
        if padded(node):
            return np.where(constants == 0, bias64, np.nan)
        return constants * sums + bias64

    def _batchnorm(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        value = self._only_data_input(node, region)
        if node.attributes.get_int("training_mode", 0):
            raise Blocked(f"are read by {describe(node)} in training mode")
        parameters = [self.constant(item) for item in node.inputs[1:5]]
        channels = self.layouts[value].channels
        if len(parameters) != 4 or any(array is None or array.shape != (channels,) for array in parameters):
            raise Blocked(f"are read by {describe(node)}, whose parameters are not constant (C,) vectors")
        self.batchnorms.append(node)
        scale, offset, mean, var = (array.astype(np.float64) for array in parameters)
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        self._pass_through(node, value, lambda x: (x - mean) * scale / np.sqrt(var + epsilon) + offset)

    def _unary(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        value = self._only_data_input(node, region)
        function = UNARY[node.op_type](node, self.constant)
        if function is None:
            raise Blocked(f"are read by {describe(node)}, whose parameters are not constant")
        self._pass_through(node, value, function)

    def _pool(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        value = self._only_data_input(node, region)
        keeps_constant = node.op_type in ("MaxPool", "GlobalAveragePool", "GlobalMaxPool") or (
            node.op_type == "AveragePool" and (not padded(node) or node.attributes.get_int("count_include_pad", 0) == 0)
        )
        if keeps_constant:
            self._pass_through(node, value, lambda x: x)
        elif node.op_type == "AveragePool":  # padded borders average in zeros: only 0 stays constant
            self._pass_through(node, value, lambda x: np.where(x == 0, 0.0, np.nan))
        else:
            self._pass_through(node, value, None)

    def _reduce(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        value = self._only_data_input(node, region)
        rank = self.layouts[value].rank
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            axes_array = self.constant(node.inputs[1])
            if axes_array is None:
                raise Blocked(f"are read by {describe(node)}, whose axes are not constant")
            axes = [int(axis) for axis in axes_array.reshape(-1)]
        else:
            axes = list(node.attributes.get_ints("axes", []))
        axes = sorted({axis % rank for axis in axes})
        if not axes or 0 in axes or 1 in axes or self.layouts[value].block != 1:
            raise Blocked(f"are reduced by {describe(node)} over the batch or channel axis")
        keepdims = node.attributes.get_int("keepdims", 1)
        self._pass_through(node, value, lambda x: x, rank=rank if keepdims else rank - len(axes))

    def _elementwise(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        if any(extra.uses() for extra in node.outputs[1:]):
            raise Blocked(f"are read by {describe(node)}, whose extra outputs are used")
        output = node.outputs[0]
        first = self.layouts[region[0][1]]
        if output.shape is not None and (len(output.shape) != first.rank or output.shape[1] != first.channels * first.block):
            raise Blocked(f"are broadcast by {describe(node)} to another shape")
        operands: list[np.ndarray] = []
        for index, value in enumerate(node.inputs):
            if value is None:
                raise Blocked(f"are read by {describe(node)} with a missing operand")
            if value in self.layouts:
                self._tie(node, first, self.layouts[value])
                operands.append(self.constants[value][:, None] if self.masked else None)
                continue
            array = self.constant(value)
            if array is not None:
                axis = array.ndim - first.rank + 1  # axis 1 of the region value, in the constant
                if array.ndim > first.rank:
                    raise Blocked(f"are broadcast by {describe(node)} to a higher rank")
                if axis >= 0 and array.shape[axis] not in (1, first.channels * first.block):
                    raise Blocked(f"meet a constant of shape {array.shape} in {describe(node)}")
                if axis >= 0 and array.shape[axis] > 1:
                    self.constant_operands.append((node, index, region[0][1]))
                operands.append(per_channel_constant(array, axis, first) if self.masked else None)
                continue
            channel_axis = len(value.shape) - first.rank + 1 if value.shape is not None else None
            if channel_axis is not None and (channel_axis < 0 or value.shape[channel_axis] == 1):
                operands.append(np.full((first.channels, 1), np.nan))  # broadcast over the channels, not constant
                continue
            other = self.opaque(value, f"{producer_text(value)}")
            if other is None:
                raise Blocked(f"meet '{value.name}' of unknown shape in {describe(node)}")
            self._tie(node, first, other)
            operands.append(self.constants[value][:, None] if self.masked else None)
        self.layouts[output] = first
        if self.masked:
            with np.errstate(all="ignore"):
                result = ELEMENTWISE[node.op_type]([np.broadcast_to(x, (first.channels, 1)) for x in operands])
            self.constants[output] = np.asarray(result, dtype=np.float64).reshape(first.channels)

    def _tie(self, node: ir.Node, first: Layout, other: Layout) -> None:
        shapes = [length for _, length in first.segments], [length for _, length in other.segments]
        if shapes[0] != shapes[1] or first.block != other.block or first.rank != other.rank:
            self.block(first, f"are combined by {describe(node)} with channels grouped differently")
            self.block(other, f"are combined by {describe(node)} with channels grouped differently")
            return
        for (a, _), (b, _) in zip(first.segments, other.segments, strict=True):
            self.union(a, b, describe(node))

    def _concat(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        rank = self.layouts[region[0][1]].rank
        axis = node.attributes.get_int("axis", 1) % rank
        if axis != 1:
            raise Blocked(f"are concatenated by {describe(node)} on axis {axis}, not the channel axis")
        layouts = []
        for value in node.inputs:
            layout = self.layouts.get(value) if value is not None else None
            if layout is None and value is not None:
                layout = self.opaque(value, producer_text(value))
            if layout is None:
                raise Blocked(f"are concatenated by {describe(node)} with a value of unknown shape")
            layouts.append(layout)
        if len({layout.block for layout in layouts}) != 1 or len({layout.rank for layout in layouts}) != 1:
            raise Blocked(f"are concatenated by {describe(node)} with differently flattened values")
        segments = tuple(segment for layout in layouts for segment in layout.segments)
        self.layouts[node.outputs[0]] = Layout(segments, rank, layouts[0].block)
        if self.masked:
            self.constants[node.outputs[0]] = np.concatenate([self.constants[value] for value in node.inputs])

    def _flatten(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        value = self._only_data_input(node, region)
        layout = self.layouts[value]
        shape, output_shape = value.shape, node.outputs[0].shape
        if shape is None or output_shape is None or not all(isinstance(dim, int) for dim in (*shape, *output_shape)):
            raise Blocked(f"are reshaped by {describe(node)} with unknown static shapes")
        keeps_channels = len(output_shape) >= 2 and output_shape[0] == shape[0]
        if node.op_type == "Flatten" and node.attributes.get_int("axis", 1) % max(len(shape), 1) != 1:
            keeps_channels = False
        if node.op_type == "Squeeze":
            keeps_channels = keeps_channels and output_shape[1] == shape[1]
        elif keeps_channels:  # Flatten / Reshape: only (N, C, ...) -> (N, C * H * W)
            keeps_channels = len(output_shape) == 2 and output_shape[1] == math.prod(shape[1:])
        if not keeps_channels:
            raise Blocked(f"are reshaped by {describe(node)} to {tuple(output_shape)}, not flattened")
        if node.op_type == "Reshape":
            target = self.constant(input_at(node, 1))
            if target is None:
                raise Blocked(f"are reshaped by {describe(node)} to a shape that is not constant")
            if target.reshape(-1)[1] > 0:
                self.reshapes.append(node)
        block = layout.block * (math.prod(shape[2:]) if len(output_shape) == 2 else 1)
        self.layouts[node.outputs[0]] = Layout(layout.segments, len(output_shape), block)
        if self.masked:
            self.constants[node.outputs[0]] = self.constants[value]

    def _dense(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        value = self._only_data_input(node, region)
        if self.layouts[value].rank != 2:
            raise Blocked(f"are read by {describe(node)} on a rank-{self.layouts[value].rank} value")
        weight = self.constant(node.inputs[1])
        if weight is None or weight.ndim != 2:
            raise Blocked(f"are read by {describe(node)}, whose weight is not a constant matrix")
        if node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0):
                raise Blocked(f"are read by {describe(node)} with transA=1")
            if len(node.inputs) > 2 and node.inputs[2] is not None and self.constant(node.inputs[2]) is None:
                raise Blocked(f"are read by {describe(node)}, whose C is not a constant")
        self.sinks.append(Sink("gemm" if node.op_type == "Gemm" else "matmul", node, value))


class Blocked(Exception):
    """The channels met something that stops them from shrinking; the message says what."""


def padded(node: ir.Node) -> bool:
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return True
    return any(node.attributes.get_ints("pads", ()) or ())


def per_channel_constant(array: np.ndarray, axis: int, layout: Layout) -> np.ndarray:
    """(C, 1) float64 of a broadcast constant when it is uniform within each channel, else NaN."""
    array = array.astype(np.float64)
    if array.size == 1:
        return np.full((layout.channels, 1), float(array.reshape(())))
    if axis < 0 or layout.block != 1 or any(dim != 1 for position, dim in enumerate(array.shape) if position != axis):
        return np.full((layout.channels, 1), np.nan)
    return np.broadcast_to(array.reshape(-1, 1), (layout.channels, 1))


def producer_text(value: ir.Value) -> str:
    producer = value.producer()
    if producer is None:
        return f"'{value.name}'"
    return f"{describe(producer)}"


def shrinkable_groups(analysis: ChannelAnalysis, exclude: tuple[str, ...]) -> Iterator[tuple[int, list[ir.Node], list[str]]]:
    """``(root space, source Convs, ties)`` of every tied group whose channels may shrink; an INFO
    line for each Conv of the other groups says why its channels may not."""
    members: dict[int, list[int]] = {}
    for space in range(len(analysis.spaces)):
        members.setdefault(analysis.root(space), []).append(space)
    excluded = set(exclude)
    for root, spaces in members.items():
        sources = [analysis.spaces[space].source for space in spaces if analysis.spaces[space].source is not None]
        if not sources:
            continue
        group = analysis.groups[root]
        reasons = list(group.reasons)
        opaque = [analysis.spaces[space].origin for space in spaces if analysis.spaces[space].source is None]
        reasons += [f"include {origin}, which cannot be pruned" for origin in opaque]
        excluded_here = [node for node in sources if node_name(node) in excluded]
        reasons += [f"include {describe(node)}, which is excluded" for node in excluded_here]
        if reasons:
            _log_skips(sources, opaque, group, reasons, excluded_here)
            continue
        yield root, sources, group.ties


def _log_skips(
    sources: list[ir.Node], opaque: list[str], group: Group, reasons: list[str], excluded: list[ir.Node]
) -> None:
    for node in sources:
        if node in excluded:
            logger.info("%s skipped: excluded by the exclude option", describe(node))
            continue
        others = [describe(other) for other in sources if other is not node] + opaque
        if others:
            logger.info(
                "%s skipped: its output reaches a residual %s tied to %s; the tied channels %s",
                describe(node),
                ", ".join(group.ties) or "op",
                ", ".join(others),
                "; ".join(reasons),
            )
        else:
            logger.info("%s skipped: its output channels %s", describe(node), "; ".join(reasons))
