"""Channel reduction by filter fusion: Conv output channels physically removed (``-p fuse-filters``).

Dynamic-coded filter fusion (DCFF, Lin et al., arXiv 2107.06916), applied
once after training. For a Conv layer with filters ``W_1 .. W_C`` (each
flattened to a vector)::

    d_kj   = ||W_k - W_j||_2                          (Euclidean, d_kk = 0)
    dbar   = mean of d_kj over the C(C-1) pairs j != k  (1 if all are 0)
    p_k(j) = exp(-d_kj / (dbar * t)) / sum_i exp(-d_ki / (dbar * t))   j = 1..C
    I_k    = sum_j KL(p_k || p_j) = sum_j sum_i p_k(i) log(p_k(i) / p_j(i))
    keep   = the m = max(min_channels, round((1 - ratio) * C)) filters of largest I_k
    W'_k   = sum_j p_k(j) W_j,   b'_k = sum_j p_k(j) b_j       for k in keep

The distribution of filter k runs over *all* C filters, itself included at
distance 0, so the self term always has the largest weight. That, the
importance ``sum_j KL(p_k || p_j)`` (a filter whose distribution differs
most from the others' is the most informative, and kept) and the fused
filters ``P[keep] @ W`` follow the paper's inter-similarity distribution,
KL-divergence criterion and filter fusion, as the authors' code
(github.com/lmbxmu/DCFF, main_cifar.py) computes them: a row-wise
``softmax(-cdist(W, W) / t)`` over all filters, the pairwise KL matrix summed
over j, top-m by that score. Equation numbers are not cited because they
could not be checked here. The paper writes the temperature as multiplying
the distance (one-hot as t -> infinity); here ``t`` divides, as in that code,
so a *smaller* t is closer to plain selection. Distances are divided by
their mean ``dbar`` first, so ``t`` is scale-free: the same t means the same
sharpness for any weight scale or filter size. ``round`` rounds halves up;
logs are natural (the base only scales I_k); the math is in float64 and the
results keep the weight's dtype.

A BatchNormalization after a fused Conv is sliced, not fused (it normalises
the fused filter's output as it normalised the original's); the next layer's
input channels are sliced to the kept ones, and everything between, as the
channel-dependency analysis finds it (passes/channel_analysis.py: what is
sliced, which Convs shrink together, and when a Conv is skipped, with an INFO
line saying why). Tensors shrink (fewer output channels, fewer MACs, smaller
initializers); no zeros are left in place.

DCFF fuses during training; used once after training it is an approximation.
The default ``t = 0.1`` and the advice to run ``fold-bn`` first (distances
then compare the BN-scaled filters) come from the digits CNN measured in
tests/passes/test_fuse_filters.py. Lossless removal of channels that
training zeroed is the zero-channels pass (passes/remove_zero_channels.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from edgec.passes.channel_analysis import ChannelAnalysis, node_name
from edgec.passes.channel_ops import zero_filters
from edgec.passes.channel_rewrite import ChannelShrinkPass, Plan, fuse_filters
from edgec.passes.graph_edit import describe
from edgec.passes.options import option_help, require_node_names
from edgec.passes.remove_zero_channels import RemoveZeroChannelsPass

logger = logging.getLogger(__name__)

__all__ = [
    "FuseFiltersPass",
    "filter_distances",
    "fuse_filters",
    "keep_count",
    "kl_importance",
    "select_filters",
    "similarity_distribution",
    "zero_filters",
]


# --------------------------------------------------------------------------
# The math: pure NumPy, float64 inside, the caller's dtype outside.
# --------------------------------------------------------------------------


def filter_distances(weight: np.ndarray) -> np.ndarray:
    """``d[k, j] = ||W_k - W_j||_2`` between the filters (axis 0) of ``weight``; (C, C), float64, zero diagonal."""
    flat = np.asarray(weight, dtype=np.float64).reshape(np.shape(weight)[0], -1)
    flat = flat - flat.mean(axis=0)  # distances are translation-invariant; centring reduces cancellation
    norms = np.einsum("ij,ij->i", flat, flat)
    scale = norms[:, None] + norms[None, :]
    squared = scale - 2.0 * (flat @ flat.T)  # ||a||^2 + ||b||^2 - 2 a.b: O(C^2 K) without a (C, C, K) array
    squared[squared <= 1e-12 * scale] = 0.0  # rounding noise of (nearly) identical filters is distance 0
    distances = np.sqrt(np.maximum(squared, 0.0))
    np.fill_diagonal(distances, 0.0)
    return distances


def similarity_distribution(weight: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """DCFF's inter-similarity distributions, one row per filter: ``P[k, j] = p_k(j)``.

    ``p_k(j) = softmax_j(-d_kj / (dbar * t))`` over all filters j, itself
    included (``d_kk = 0``), with ``dbar`` the mean distance between distinct
    filters (the module docstring). Rows sum to 1.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    distances = filter_distances(weight)
    count = distances.shape[0]
    mean = distances.sum() / (count * (count - 1)) if count > 1 else 0.0
    scaled = distances / mean if mean > 0 else np.zeros_like(distances)
    logits = -scaled / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def kl_importance(distribution: np.ndarray) -> np.ndarray:
    """``I_k = sum_j KL(p_k || p_j)`` for the rows ``p_k`` of ``distribution``; (C,), float64.

    An entry that underflowed to 0 counts as ``0 * log 0 = 0`` where it is
    ``p_k``'s, and as the smallest positive float where it is ``p_j``'s.
    """
    probabilities = np.asarray(distribution, dtype=np.float64)
    logs = np.log(np.maximum(probabilities, np.finfo(np.float64).tiny))
    negative_entropy = np.sum(probabilities * logs, axis=1)  # sum_i p_k(i) log p_k(i)
    divergences = negative_entropy[:, None] - probabilities @ logs.T  # [k, j] = KL(p_k || p_j)
    np.fill_diagonal(divergences, 0.0)
    return divergences.sum(axis=1)


def keep_count(channels: int, ratio: float, min_channels: int = 1) -> int:
    """Filters kept of ``channels`` at pruning ``ratio``: ``round((1 - ratio) * C)`` (halves up), clamped to [min, C]."""
    kept = math.floor((1.0 - ratio) * channels + 0.5)
    return int(min(channels, max(kept, min_channels, 1)))


def select_filters(importance: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` most important filters, in ascending channel order (ties: lower index wins)."""
    importance = np.asarray(importance, dtype=np.float64)
    order = np.argsort(-importance, kind="stable")
    return np.sort(order[:keep])


# --------------------------------------------------------------------------
# The pass: graph plumbing only.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FuseFiltersPass(ChannelShrinkPass):
    """Remove Conv output channels by DCFF filter fusion.

    ``p_k(j) = softmax_j(-||W_k - W_j|| / (mean distance * t))`` over all
    filters j (self included), importance ``sum_j KL(p_k || p_j)``, keep the
    top ``round((1 - ratio) * C)``, each kept filter replaced by ``sum_j p_k(j) W_j``.
    Consumers are sliced to match; see the module docstring. ``mode=masked``
    (deprecated) runs the zero-channels pass instead.
    """

    cli_name: ClassVar[str] = "fuse-filters"

    ratio: float = dataclasses.field(
        default=0.5, metadata=option_help("fraction of each Conv's filters to remove")
    )
    layer_ratios: dict[str, float] = dataclasses.field(
        default_factory=dict, metadata=option_help("per-Conv ratios by node name, overriding ratio")
    )
    temperature: float = dataclasses.field(
        default=0.1,
        metadata=option_help(
            "softmax temperature t on mean-normalised distances; smaller = fused filters closer to the "
            "originals; without fine-tuning 0.1 kept accuracy best on the digits CNN, 1.0 averages filters to chance"
        ),
    )
    mode: Literal["fuse", "masked"] = dataclasses.field(
        default="fuse",
        metadata=option_help("deprecated: masked runs the zero-channels pass (-p zero-channels) instead of DCFF fusion"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        for name, value in self.layer_ratios.items():
            if not 0.0 <= value < 1.0:
                raise ValueError(f"layer_ratios[{name!r}] must be in [0, 1), got {value}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.mode not in ("fuse", "masked"):
            raise ValueError(f"mode must be 'fuse' or 'masked', got {self.mode!r}")

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        require_node_names(model, self.layer_ratios, "layer_ratios", self.cli_name, output_names=True)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.mode == "masked":
            note = (
                "fuse-filters mode=masked is the zero-channels pass now: write -p zero-channels "
                "(RemoveZeroChannelsPass); mode= will be removed"
            )
            warnings.warn(note, DeprecationWarning, stacklevel=2)
            logger.warning(note)  # DeprecationWarnings are hidden outside __main__: the CLI user sees this
            return RemoveZeroChannelsPass(exclude=self.exclude, min_channels=self.min_channels).call(model)
        return super().call(model)

    def _plan(self, analysis: ChannelAnalysis, root: int, sources: list[ir.Node], channels: int) -> Plan | None:
        """One keep-set for a tied group: the smallest ratio of its Convs, by summed importance."""
        ratio = min(self.layer_ratios.get(node_name(node), self.ratio) for node in sources)
        keep = keep_count(channels, ratio, self.min_channels)
        if keep >= channels:
            logger.debug("%s: ratio %g keeps all %d channels", describe(sources[0]), ratio, channels)
            return None
        distributions: dict[ir.Node, np.ndarray | None] = {}
        importance = np.zeros(channels)
        for node in sources:
            weight = analysis.constant(node.inputs[1])
            distributions[node] = similarity_distribution(weight, self.temperature)
            importance += kl_importance(distributions[node])
        return Plan(select_filters(importance, keep), sources, distributions)
