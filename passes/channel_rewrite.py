"""Rewriting a graph whose Conv output channels shrink, as passes/channel_analysis.py found them.

A ``Plan`` per tied group says which channels stay (and, for filter fusion,
how each kept filter mixes the old ones); ``ChannelRewriter`` makes every
tensor that carries those channels agree. Constants that change become new
initializers (passes/graph_edit.py): under the old name when only the
rewritten node read it, else as ``<old name>_pruned``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from edgec.passes.channel_analysis import ChannelAnalysis, Layout, Sink, node_name, shrinkable_groups
from edgec.passes.graph_edit import GraphEditor, describe, input_at
from edgec.passes.options import option_help, require_node_names

logger = logging.getLogger(__name__)

__all__ = ["ChannelRewriter", "ChannelShrinkPass", "Plan", "fuse_filters", "shrink_channels"]


@dataclasses.dataclass
class Plan:
    """One tied group's decision: kept channel indices, and per-source fusion matrices."""

    keep: np.ndarray
    sources: list[ir.Node]
    distributions: dict[ir.Node, np.ndarray | None]  # None: plain selection


PlanMaker = Callable[[ChannelAnalysis, int, list[ir.Node], int], "Plan | None"]


def shrink_channels(model: ir.Model, *, masked: bool, exclude: tuple[str, ...], plan: PlanMaker) -> bool:
    """Analyse ``model``'s channels, ask ``plan(analysis, root, sources, channels)`` for each tied
    group that may shrink (None: it stays), rewrite; True when a group shrank."""
    analysis = ChannelAnalysis(model, masked=masked)
    analysis.run()
    plans: dict[int, Plan] = {}
    for root, sources, ties in shrinkable_groups(analysis, exclude):
        channels = analysis.spaces[root].channels
        found = plan(analysis, root, sources, channels)
        if found is not None:
            plans[root] = found
            _log_shrink(sources, channels, found, ties)
    if plans:
        ChannelRewriter(model, analysis, plans).apply()
    return bool(plans)


def _log_shrink(sources: list[ir.Node], channels: int, plan: Plan, ties: list[str]) -> None:
    """The INFO line of a tied group that shrinks."""
    logger.info(
        "%s: %d -> %d output channels%s",
        ", ".join(describe(node) for node in sources),
        channels,
        len(plan.keep),
        f" (tied by {', '.join(ties)})" if ties else "",
    )


def fuse_filters(
    weight: np.ndarray, distribution: np.ndarray, keep: np.ndarray, bias: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """DCFF's fused filters ``W'_k = sum_j p_k(j) W_j`` (and biases) for ``k`` in ``keep``; dtypes kept."""
    weight = np.asarray(weight)
    rows = np.asarray(distribution, dtype=np.float64)[np.asarray(keep)]
    flat = weight.astype(np.float64).reshape(weight.shape[0], -1)
    fused = (rows @ flat).reshape((len(rows), *weight.shape[1:])).astype(weight.dtype)
    fused_bias = None
    if bias is not None:
        bias = np.asarray(bias)
        fused_bias = (rows @ bias.astype(np.float64)).astype(bias.dtype)
    return fused, fused_bias


@dataclasses.dataclass(frozen=True)
class ChannelShrinkPass(ir.passes.InPlacePass):
    """What the channel-removing passes share: ``exclude`` and ``min_channels``, their
    checks, and the driver (``shrink_channels``) fed by the subclass's ``_plan``.
    ``masked``: the removed channels' outputs are constant and fold into the next bias."""

    masked: ClassVar[bool] = False

    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata=option_help("Conv node names to leave untouched"))
    min_channels: int = dataclasses.field(default=1, metadata=option_help("keep at least this many channels per Conv"))

    def __post_init__(self) -> None:
        if self.min_channels < 1:
            raise ValueError(f"min_channels must be >= 1, got {self.min_channels}")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))

    def requires(self, model: ir.Model) -> None:
        require_node_names(model, self.exclude, "exclude", self.cli_name, output_names=True)  # type: ignore[attr-defined]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = shrink_channels(model, masked=self.masked, exclude=self.exclude, plan=self._plan)
        return ir.passes.PassResult(model, modified=modified)

    def _plan(self, analysis: ChannelAnalysis, root: int, sources: list[ir.Node], channels: int) -> Plan | None:
        """The channels to keep for one tied group of ``sources`` (None: keep all)."""
        raise NotImplementedError


class ChannelRewriter:
    """Slices every tensor the analysis tied to a shrunk space: the sources' output channels
    (kept, or fused with a plan's distribution), depthwise Convs, BatchNormalizations,
    per-channel constants, Reshape targets, the sinks' input channels (with the constants of
    removed channels folded into their bias when the analysis tracked them), value shapes."""

    def __init__(self, model: ir.Model, analysis: ChannelAnalysis, plans: dict[int, Plan]) -> None:
        self.analysis = analysis
        self.plans = plans
        self.edit = GraphEditor(model)

    def kept_channels(self, layout: Layout) -> np.ndarray:
        parts, offset = [], 0
        for space, length in layout.segments:
            plan = self.plans.get(self.analysis.root(space))
            parts.append(offset + (plan.keep if plan is not None else np.arange(length)))
            offset += length
        return np.concatenate(parts).astype(np.int64)

    def kept_columns(self, layout: Layout) -> np.ndarray:
        channels = self.kept_channels(layout)
        return (channels[:, None] * layout.block + np.arange(layout.block)[None, :]).reshape(-1)

    def apply(self) -> None:
        analysis = self.analysis
        convs: dict[ir.Node, dict] = {}
        for plan in self.plans.values():
            for node in plan.sources:
                convs.setdefault(node, {})["output"] = (plan.keep, plan.distributions[node])
        dense_sinks = []
        for sink in analysis.sinks:
            if sink.kind == "conv":
                convs.setdefault(sink.node, {})["input"] = sink.value
            else:
                dense_sinks.append(sink)
        for node, edits in convs.items():
            self._conv(node, edits.get("output"), edits.get("input"))
        for sink in dense_sinks:
            self._dense(sink)
        for node in analysis.depthwise:
            self._depthwise(node)
        for node in analysis.batchnorms:
            channels = self.kept_channels(analysis.layouts[node.inputs[0]])
            for index in range(1, 5):
                self._slice_input(node, index, channels, 0)
        for node, index, value in analysis.constant_operands:
            layout = analysis.layouts[value]
            array = analysis.constant(node.inputs[index])
            self._slice_input(node, index, self.kept_columns(layout), array.ndim - layout.rank + 1)
        for node in analysis.reshapes:
            target = analysis.constant(node.inputs[1]).copy()
            columns = len(self.kept_columns(analysis.layouts[node.outputs[0]]))
            if target.reshape(-1)[1] != columns:
                target.reshape(-1)[1] = columns
                self._set_input(node, 1, target)
        for value, layout in analysis.layouts.items():
            if value.shape is None or value.is_graph_output() or len(value.shape) < 2:
                continue
            columns = len(self.kept_columns(layout))
            if value.shape[1] != columns:
                dims = list(value.shape)
                dims[1] = columns
                value.shape = ir.Shape(dims)

    def _conv(self, node: ir.Node, output: tuple[np.ndarray, np.ndarray | None] | None, value: ir.Value | None) -> None:
        """A Conv as a source (output channels kept or fused) and/or a sink (input channels sliced)."""
        analysis = self.analysis
        weight = analysis.constant(node.inputs[1])
        bias = analysis.constant(input_at(node, 2))
        new_weight, new_bias = weight, bias
        if value is not None and analysis.masked:  # fold the constants of removed input channels into the bias
            layout = analysis.layouts[value]
            removed = np.setdiff1d(np.arange(layout.channels), self.kept_channels(layout))
            kernel = math.prod(weight.shape[2:])
            sums = weight.astype(np.float64)[:, removed].reshape(weight.shape[0], len(removed), kernel).sum(axis=2)
            contribution = sums @ np.nan_to_num(analysis.constants[value][removed])
            if np.any(contribution != 0):
                base = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
                new_bias = (base + contribution).astype(weight.dtype if bias is None else bias.dtype)
        if output is not None:
            keep, distribution = output
            if distribution is None:
                new_weight = new_weight[keep]
                new_bias = None if new_bias is None else new_bias[keep]
            else:
                new_weight, new_bias = fuse_filters(new_weight, distribution, keep, new_bias)
        if value is not None:
            kept_in = self.kept_channels(analysis.layouts[value])
            if len(kept_in) != new_weight.shape[1]:
                new_weight = new_weight[:, kept_in]
        if new_weight is not weight:
            self._set_input(node, 1, new_weight)
        if new_bias is not bias:
            self._set_input(node, 2, new_bias)

    def _dense(self, sink: Sink) -> None:
        analysis, node = self.analysis, sink.node
        layout = analysis.layouts[sink.value]
        columns = self.kept_columns(layout)
        weight = analysis.constant(node.inputs[1])
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
        rows = weight.T if transposed else weight  # (K, N)
        if analysis.masked and node.op_type == "Gemm":
            removed_channels = np.setdiff1d(np.arange(layout.channels), self.kept_channels(layout))
            constants = np.nan_to_num(analysis.constants[sink.value][removed_channels])
            removed_columns = (removed_channels[:, None] * layout.block + np.arange(layout.block)).reshape(-1)
            column_constants = np.repeat(constants, layout.block)
            contribution = column_constants @ rows.astype(np.float64)[removed_columns]
            if np.any(contribution != 0):
                alpha = node.attributes.get_float("alpha", 1.0)
                beta = node.attributes.get_float("beta", 1.0)
                c = analysis.constant(input_at(node, 2))
                base = np.zeros(rows.shape[1]) if c is None else c.astype(np.float64)
                self._set_input(node, 2, (base + contribution * alpha / beta).astype(weight.dtype))
        if len(columns) != rows.shape[0]:
            self._set_input(node, 1, weight[:, columns] if transposed else weight[columns])

    def _depthwise(self, node: ir.Node) -> None:
        channels = self.kept_channels(self.analysis.layouts[node.inputs[0]])
        self._slice_input(node, 1, channels, 0)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self._slice_input(node, 2, channels, 0)
        if node.attributes.get_int("group", 1) != len(channels):
            node.attributes["group"] = ir.AttrInt64("group", len(channels))

    def _slice_input(self, node: ir.Node, index: int, indices: np.ndarray, axis: int) -> None:
        array = self.analysis.constant(node.inputs[index])
        if axis < 0 or array.shape[axis] == 1 or array.shape[axis] == len(indices):
            return
        self._set_input(node, index, np.take(array, indices, axis=axis))

    def _set_input(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Give input ``index`` of ``node`` a new constant: under the old initializer's name when
        only this node read it, else as ``<old name>_pruned``."""
        old = node.inputs[index] if index < len(node.inputs) else None
        if old is not None and old.is_initializer() and not old.is_graph_input() and len(old.uses()) == 1:
            base = None
        else:
            base = f"{old.name if old is not None and old.name else node_name(node) + '_bias'}_pruned"
        self.edit.set_input(node, index, array, base)
