"""Remove Conv output channels that training zeroed, exactly (``-p zero-channels``).

Lossless removal of channels that training-time channel pruning left
constant. Channel c is removed when its filter is all
zero in every Conv of its tied group (below), so the Conv outputs the
constant ``kappa_c = b_c`` (0 without bias) everywhere. The constant is
propagated exactly through the ops between the Conv and its consumers
(BatchNormalization, the activations, pooling, a depthwise Conv, constant
Add/Mul, residual Add) and folded into each consumer's bias::

    Conv  (group 1)  b'_o = b_o + sum_c kappa_c * sum_{kh,kw} W[o, c, kh, kw]
    Gemm             C'_o = C_o + (alpha / beta) * sum_c kappa_c * sum_{cols of c} B[col, o]

Folding into a Conv is exact only when that Conv has no padding (a padded
border sees 0, not kappa_c), and a MatMul has no bias: there (and after an
AveragePool or depthwise Conv with padding) only channels with
``kappa_c == 0`` are removed; a channel that is not constant at every
consumer stays. What is sliced with the removed channels, which Convs are
tied, and when a Conv is skipped is the channel-dependency analysis's
(passes/channel_analysis.py), shared with fuse-filters.

Formerly ``fuse-filters`` with ``mode=masked`` (still accepted there, with a
DeprecationWarning).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from edgec.passes.channel_analysis import ChannelAnalysis, Sink, padded
from edgec.passes.channel_ops import zero_filters
from edgec.passes.channel_rewrite import ChannelShrinkPass, Plan


__all__ = ["RemoveZeroChannelsPass"]


@dataclasses.dataclass(frozen=True)
class RemoveZeroChannelsPass(ChannelShrinkPass):
    """Remove Conv output channels whose filters are all zero, exactly (their output goes into the next bias).

    The constant such a channel outputs is folded into the bias of the layers
    reading it; consumers are sliced to match; see the module docstring."""

    cli_name: ClassVar[str] = "zero-channels"
    masked: ClassVar[bool] = True

    def _plan(self, analysis: ChannelAnalysis, root: int, sources: list[ir.Node], channels: int) -> Plan | None:
        return _masked_plan(analysis, root, sources, channels, self.min_channels)


def _masked_plan(analysis: ChannelAnalysis, root: int, sources: list[ir.Node], channels: int, min_channels: int) -> Plan | None:
    removable = np.ones(channels, dtype=bool)
    for node in sources:
        removable &= zero_filters(analysis.constant(node.inputs[1]))
    if not removable.any():
        return None
    for sink in analysis.sinks:
        constants = analysis.constants[sink.value]
        foldable = _foldable(analysis, sink, constants)
        offset = 0
        for space, length in analysis.layouts[sink.value].segments:
            if analysis.root(space) == root:
                removable &= foldable[offset : offset + length]
            offset += length
    removed = np.flatnonzero(removable)
    keep_mask = ~removable
    shortfall = min(min_channels, channels) - int(keep_mask.sum())
    if shortfall > 0:  # keep at least min_channels: put back the first removable ones
        keep_mask[removed[:shortfall]] = True
    if keep_mask.all():
        return None
    return Plan(np.flatnonzero(keep_mask), sources, dict.fromkeys(sources))


def _foldable(analysis: ChannelAnalysis, sink: Sink, constants: np.ndarray) -> np.ndarray:
    """Per input channel of the sink: constant, and its constant folds exactly into the sink's bias."""
    constant = ~np.isnan(constants)
    zero = constants == 0
    if sink.kind == "conv":
        return zero | (constant & (not padded(sink.node)))
    if sink.kind == "gemm":
        return zero | (constant & (sink.node.attributes.get_float("beta", 1.0) != 0))
    return zero
