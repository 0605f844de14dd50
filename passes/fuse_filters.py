"""Channel reduction by weight surgery: Conv output channels physically removed.

Two modes; both shrink tensors (fewer output channels, fewer MACs, smaller
initializers), never leave zeros in place.

``mode="fuse"`` -- dynamic-coded filter fusion (DCFF, Lin et al., arXiv
2107.06916), applied once after training. For a Conv layer with filters
``W_1 .. W_C`` (each flattened to a vector)::

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
input channels are sliced to the kept ones. DCFF fuses during training; used
once after training, without fine-tuning, it is an approximation, and two
measured facts matter (a small CNN on scikit-learn's digits,
tests/passes/test_fuse_filters.py): at t = 1 the mean-normalised softmax is
nearly uniform (every other filter weighs about e^-1 of the self term), each
kept filter becomes close to the layer's mean filter, and accuracy falls to
chance; t around 0.1 keeps the kept filters nearly intact, hence the
default t = 0.1. And raw Conv
weights in front of a BatchNormalization have arbitrary per-filter scales:
running ``fold-bn`` first makes the distances compare the effective
(BN-scaled) filters; on that CNN it made results steadier across training
seeds (worst of four at ratio 0.5: 0.37 against 0.11), though not always
higher.

``mode="masked"`` -- lossless removal of channels that training-time
channel pruning left constant. Channel c is removed when its filter is all
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
consumer stays. ``ratio``, ``layer_ratios`` and ``temperature`` are for the
fuse mode; ``exclude`` and ``min_channels`` apply to both.

Channel-dependency analysis (what gets sliced with a Conv's output channels):
every value carries a layout -- the channel sets ("spaces") it holds along
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
one, with one keep-set (chosen from the summed importance of its Convs in
fuse mode, the smallest ratio of its members; channels removable in all of
them in masked mode), every Conv fusing its own filters.

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
from collections.abc import Callable
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir

from edgec.passes.constants import Constants
from edgec.passes.graph_edit import GraphEditor
from edgec.passes.registry import option_help, require_node_names

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


def zero_filters(weight: np.ndarray) -> np.ndarray:
    """Boolean (C,): filter k (axis 0) is exactly zero."""
    weight = np.asarray(weight)
    return ~np.any(weight.reshape(weight.shape[0], -1) != 0, axis=1)


# Element-wise unary ops a channel passes through unchanged, with their effect on a constant.
def _clip_function(node: ir.Node, constant: Callable[[ir.Value | None], np.ndarray | None]):
    if len(node.inputs) > 1:  # opset >= 11: min and max are optional inputs
        bounds = []
        for index in (1, 2):
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None:
                bounds.append(None)
                continue
            array = constant(value)
            if array is None or array.size != 1:
                return None
            bounds.append(float(array.reshape(())))
        low, high = bounds
    else:
        low = node.attributes.get_float("min", -np.inf)
        high = node.attributes.get_float("max", np.inf)
    return lambda x: np.clip(x, -np.inf if low is None else low, np.inf if high is None else high)


def _attr(node: ir.Node, name: str, default: float) -> float:
    return node.attributes.get_float(name, default)


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _gelu(node: ir.Node) -> Callable[[np.ndarray], np.ndarray]:
    if node.attributes.get_string("approximate", "none") == "tanh":
        return lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2.0)))


_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875

# op -> (node, constant lookup) -> function on float64 arrays, or None when the op's parameters are not constant
_UNARY: dict[str, Callable] = {
    "Identity": lambda node, c: lambda x: x,
    "Dropout": lambda node, c: lambda x: x,  # inference: identity
    "Relu": lambda node, c: lambda x: np.maximum(x, 0.0),
    "LeakyRelu": lambda node, c: (lambda a: lambda x: np.where(x < 0, a * x, x))(_attr(node, "alpha", 0.01)),
    "Clip": _clip_function,
    "Sigmoid": lambda node, c: lambda x: 1.0 / (1.0 + np.exp(-x)),
    "HardSigmoid": lambda node, c: (lambda a, b: lambda x: np.clip(a * x + b, 0.0, 1.0))(
        _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
    ),
    "HardSwish": lambda node, c: lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Tanh": lambda node, c: np.tanh,
    "Elu": lambda node, c: (lambda a: lambda x: np.where(x < 0, a * np.expm1(np.minimum(x, 0)), x))(
        _attr(node, "alpha", 1.0)
    ),
    "Celu": lambda node, c: (lambda a: lambda x: np.maximum(x, 0) + np.minimum(0, a * np.expm1(x / a)))(
        _attr(node, "alpha", 1.0)
    ),
    "Selu": lambda node, c: (lambda a, g: lambda x: g * np.where(x <= 0, a * np.expm1(np.minimum(x, 0)), x))(
        _attr(node, "alpha", _SELU_ALPHA), _attr(node, "gamma", _SELU_GAMMA)
    ),
    "ThresholdedRelu": lambda node, c: (lambda a: lambda x: np.where(x > a, x, 0.0))(_attr(node, "alpha", 1.0)),
    "Softplus": lambda node, c: _softplus,
    "Softsign": lambda node, c: lambda x: x / (1.0 + np.abs(x)),
    "Mish": lambda node, c: lambda x: x * np.tanh(_softplus(x)),
    "Gelu": lambda node, c: _gelu(node),
    "Neg": lambda node, c: np.negative,
    "Abs": lambda node, c: np.abs,
}

# Element-wise ops of several operands (numpy broadcasting), with their effect on constants.
_ELEMENTWISE: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {
    "Add": lambda xs: xs[0] + xs[1],
    "Sub": lambda xs: xs[0] - xs[1],
    "Mul": lambda xs: xs[0] * xs[1],
    "Div": lambda xs: xs[0] / xs[1],
    "Pow": lambda xs: np.power(xs[0], xs[1]),
    "PRelu": lambda xs: np.where(xs[0] < 0, xs[1] * xs[0], xs[0]),
    "Max": lambda xs: np.maximum.reduce(xs),
    "Min": lambda xs: np.minimum.reduce(xs),
    "Sum": lambda xs: np.add.reduce(xs),
    "Mean": lambda xs: np.add.reduce(xs) / len(xs),
}
_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
_REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceMin"})


# --------------------------------------------------------------------------
# The pass: graph plumbing only.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FuseFiltersPass(ir.passes.InPlacePass):
    """Remove Conv output channels: DCFF filter fusion (``mode="fuse"``) or exact removal of zeroed filters (``"masked"``).

    Fuse: ``p_k(j) = softmax_j(-||W_k - W_j|| / (mean distance * t))`` over
    all filters j (self included), importance ``sum_j KL(p_k || p_j)``, keep the
    top ``round((1 - ratio) * C)``, each kept filter replaced by ``sum_j p_k(j) W_j``.
    Masked: all-zero filters removed, their constant output folded into the
    next layer's bias. Consumers are sliced to match; see the module docstring.
    """

    cli_name: ClassVar[str] = "fuse-filters"

    ratio: float = dataclasses.field(
        default=0.5, metadata=option_help("fraction of each Conv's filters to remove (fuse mode)")
    )
    layer_ratios: dict[str, float] = dataclasses.field(
        default_factory=dict, metadata=option_help("per-Conv ratios by node name, overriding ratio (fuse mode)")
    )
    temperature: float = dataclasses.field(
        default=0.1,
        metadata=option_help(
            "softmax temperature t on mean-normalised distances (fuse mode); smaller = fused filters closer to the "
            "originals; without fine-tuning 0.1 kept accuracy best on the digits CNN, 1.0 averages filters to chance"
        ),
    )
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata=option_help("Conv node names to leave untouched"))
    mode: Literal["fuse", "masked"] = dataclasses.field(
        default="fuse", metadata=option_help("fuse: DCFF filter fusion (lossy); masked: remove all-zero filters exactly")
    )
    min_channels: int = dataclasses.field(default=1, metadata=option_help("keep at least this many channels per Conv"))

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        for name, value in self.layer_ratios.items():
            if not 0.0 <= value < 1.0:
                raise ValueError(f"layer_ratios[{name!r}] must be in [0, 1), got {value}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.mode not in ("fuse", "masked"):
            raise ValueError(f"mode must be 'fuse' or 'masked', got {self.mode!r}")
        if self.min_channels < 1:
            raise ValueError(f"min_channels must be >= 1, got {self.min_channels}")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))

    def requires(self, model: ir.Model) -> None:
        require_node_names(model, self.exclude, "exclude", self.cli_name, output_names=True)
        require_node_names(model, self.layer_ratios, "layer_ratios", self.cli_name, output_names=True)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        analysis = _Analysis(model, masked=self.mode == "masked")
        analysis.run()
        plans = _decide(analysis, self)
        if plans:
            _Rewriter(model, analysis, plans).apply()
        return ir.passes.PassResult(model, modified=bool(plans))


# --------------------------------------------------------------------------
# The channel-dependency analysis (a local of FuseFiltersPass.call).
# --------------------------------------------------------------------------


def _describe(node: ir.Node) -> str:
    op = node.op_type if node.domain == "" else f"{node.domain}.{node.op_type}"
    return f"{op} '{_node_name(node)}'"


def _node_name(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else "") or "?"


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The channels of a value along axis 1: spaces in order, and columns per channel (H*W after a Flatten)."""

    segments: tuple[tuple[int, int], ...]  # (space id, channels)
    rank: int
    block: int = 1

    @property
    def channels(self) -> int:
        return sum(length for _, length in self.segments)


@dataclasses.dataclass
class _Space:
    origin: str  # "Conv 'c1'" or "graph input 'x'" ...
    channels: int
    source: ir.Node | None  # the Conv whose output channels these are; None for an opaque origin


@dataclasses.dataclass
class _Group:
    """A union-find root's bookkeeping: why it cannot shrink, and which ops tied it together."""

    reasons: list[str] = dataclasses.field(default_factory=list)
    ties: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Sink:
    kind: Literal["conv", "gemm", "matmul"]
    node: ir.Node
    value: ir.Value  # the input that carries the channels


class _Analysis:
    """Layouts of every value reached by Conv channels, the ties between them, and what must be sliced."""

    def __init__(self, model: ir.Model, *, masked: bool) -> None:
        self.graph = model.graph
        self.constant = Constants(model)
        self.masked = masked
        self.layouts: dict[ir.Value, _Layout] = {}
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.groups: dict[int, _Group] = {}
        self.sinks: list[_Sink] = []
        self.depthwise: list[ir.Node] = []  # Convs sliced along their channels (input == output)
        self.batchnorms: list[ir.Node] = []
        self.constant_operands: list[tuple[ir.Node, int, ir.Value]] = []  # (node, input index, region value)
        self.reshapes: list[ir.Node] = []
        # masked mode: the per-channel constant of each value (NaN: not constant)
        self.constants: dict[ir.Value, np.ndarray] = {}

    # ---- union-find -------------------------------------------------------

    def new_space(self, origin: str, channels: int, source: ir.Node | None) -> int:
        self.spaces.append(_Space(origin, channels, source))
        self.parent.append(len(self.parent))
        self.groups[len(self.parent) - 1] = _Group()
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

    def block(self, layout: _Layout, reason: str) -> None:
        for space, _ in layout.segments:
            group = self.groups[self.root(space)]
            if reason not in group.reasons:
                group.reasons.append(reason)

    def opaque(self, value: ir.Value, what: str) -> _Layout | None:
        """A layout for a value that carries channels no Conv of ours produced (they cannot shrink)."""
        if value.shape is None or len(value.shape) < 2 or not isinstance(value.shape[1], int):
            return None
        layout = _Layout(((self.new_space(what, value.shape[1], None), value.shape[1]),), len(value.shape))
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
                    self.block(layout, f"are read inside a subgraph by {_describe(use.node)}")
                elif producer is not None and position[use.node] < position[producer]:
                    # visited before the channels reached it: the graph is not topologically sorted
                    self.block(layout, f"are read by {_describe(use.node)} before they are produced (unsorted graph)")

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
            elif op in _UNARY:
                self._unary(node, region)
            elif op in _POOLS:
                self._pool(node, region)
            elif op in _REDUCES:
                self._reduce(node, region)
            elif op in _ELEMENTWISE:
                self._elementwise(node, region)
            elif op == "Concat":
                self._concat(node, region)
            elif op in ("Flatten", "Reshape", "Squeeze"):
                self._flatten(node, region)
            elif op in ("Gemm", "MatMul"):
                self._dense(node, region)
            else:
                raise _Blocked(f"are read by {_describe(node)}, which the pass does not follow")
        except _Blocked as reason:
            for _, value in region:
                self.block(self.layouts[value], str(reason))

    def _only_data_input(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> ir.Value:
        if [index for index, _ in region] != [0]:
            raise _Blocked(f"are a parameter (not the data input) of {_describe(node)}")
        for extra in node.outputs[1:]:
            if extra.uses() or extra.is_graph_output():
                raise _Blocked(f"are read by {_describe(node)}, whose extra output '{extra.name}' is used")
        return region[0][1]

    def _pass_through(self, node: ir.Node, value: ir.Value, function: Callable | None = None, rank: int | None = None):
        layout = self.layouts[value]
        if rank is not None and rank != layout.rank:
            layout = dataclasses.replace(layout, rank=rank)
        self.layouts[node.outputs[0]] = layout
        if self.masked:
            constants = self.constants[value]
            self.constants[node.outputs[0]] = (
                np.full_like(constants, np.nan) if function is None else _apply(function, constants)
            )

    # ---- the ops ----------------------------------------------------------

    def _conv(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        weight = self.constant(node.inputs[1]) if len(node.inputs) > 1 else None
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias = self.constant(bias_value)
        constant_parameters = weight is not None and weight.ndim >= 3 and (bias_value is None or bias is not None)
        group = node.attributes.get_int("group", 1)
        for index, value in region:
            layout = self.layouts[value]
            if index != 0:
                self.block(layout, f"are a parameter (not the data input) of {_describe(node)}")
            elif not constant_parameters:
                self.block(layout, f"are read by {_describe(node)}, whose weight or bias is not a constant")
            elif layout.block != 1 or layout.rank != weight.ndim:
                self.block(layout, f"reach {_describe(node)} with a different rank")
            elif group == 1:
                self.sinks.append(_Sink("conv", node, value))
            elif group == layout.channels and weight.shape[0] == group and weight.shape[1] == 1:
                self.depthwise.append(node)
                self._pass_through(node, value, None)
                if self.masked:
                    self.constants[node.outputs[0]] = self._depthwise_constants(node, weight, bias, self.constants[value])
                return  # a depthwise Conv's output channels are its input's: no new space
            else:
                self.block(layout, f"are read by grouped {_describe(node)} (group={group}), which the pass does not slice")
        if group != 1 or not constant_parameters:
            return
        output = node.outputs[0]
        channels = weight.shape[0]
        space = self.new_space(_describe(node), channels, node)
        self.layouts[output] = _Layout(((space, channels),), weight.ndim)
        if self.masked:
            filter_constant = np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(channels)
            self.constants[output] = np.where(zero_filters(weight), filter_constant, np.nan)

    def _depthwise_constants(self, node: ir.Node, weight: np.ndarray, bias: np.ndarray | None, constants: np.ndarray):
        """kappa'_c = kappa_c * sum(w_c) + b_c without padding; with padding only kappa_c = 0 stays constant (= b_c)."""
        bias64 = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
        sums = weight.astype(np.float64).reshape(weight.shape[0], -1).sum(axis=1)
        if _padded(node):
            return np.where(constants == 0, bias64, np.nan)
        return constants * sums + bias64

    def _batchnorm(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        value = self._only_data_input(node, region)
        if node.attributes.get_int("training_mode", 0):
            raise _Blocked(f"are read by {_describe(node)} in training mode")
        parameters = [self.constant(item) for item in node.inputs[1:5]]
        channels = self.layouts[value].channels
        if len(parameters) != 4 or any(array is None or array.shape != (channels,) for array in parameters):
            raise _Blocked(f"are read by {_describe(node)}, whose parameters are not constant (C,) vectors")
        self.batchnorms.append(node)
        scale, offset, mean, var = (array.astype(np.float64) for array in parameters)
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        self._pass_through(node, value, lambda x: (x - mean) * scale / np.sqrt(var + epsilon) + offset)

    def _unary(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        value = self._only_data_input(node, region)
        function = _UNARY[node.op_type](node, self.constant)
        if function is None:
            raise _Blocked(f"are read by {_describe(node)}, whose parameters are not constant")
        self._pass_through(node, value, function)

    def _pool(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        value = self._only_data_input(node, region)
        keeps_constant = node.op_type in ("MaxPool", "GlobalAveragePool", "GlobalMaxPool") or (
            node.op_type == "AveragePool" and (not _padded(node) or node.attributes.get_int("count_include_pad", 0) == 0)
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
                raise _Blocked(f"are read by {_describe(node)}, whose axes are not constant")
            axes = [int(axis) for axis in axes_array.reshape(-1)]
        else:
            axes = list(node.attributes.get_ints("axes", []))
        axes = sorted({axis % rank for axis in axes})
        if not axes or 0 in axes or 1 in axes or self.layouts[value].block != 1:
            raise _Blocked(f"are reduced by {_describe(node)} over the batch or channel axis")
        keepdims = node.attributes.get_int("keepdims", 1)
        self._pass_through(node, value, lambda x: x, rank=rank if keepdims else rank - len(axes))

    def _elementwise(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        if any(extra.uses() for extra in node.outputs[1:]):
            raise _Blocked(f"are read by {_describe(node)}, whose extra outputs are used")
        output = node.outputs[0]
        first = self.layouts[region[0][1]]
        if output.shape is not None and (len(output.shape) != first.rank or output.shape[1] != first.channels * first.block):
            raise _Blocked(f"are broadcast by {_describe(node)} to another shape")
        operands: list[np.ndarray] = []
        for index, value in enumerate(node.inputs):
            if value is None:
                raise _Blocked(f"are read by {_describe(node)} with a missing operand")
            if value in self.layouts:
                self._tie(node, first, self.layouts[value])
                operands.append(self.constants[value][:, None] if self.masked else None)
                continue
            array = self.constant(value)
            if array is not None:
                axis = array.ndim - first.rank + 1  # axis 1 of the region value, in the constant
                if array.ndim > first.rank:
                    raise _Blocked(f"are broadcast by {_describe(node)} to a higher rank")
                if axis >= 0 and array.shape[axis] not in (1, first.channels * first.block):
                    raise _Blocked(f"meet a constant of shape {array.shape} in {_describe(node)}")
                if axis >= 0 and array.shape[axis] > 1:
                    self.constant_operands.append((node, index, region[0][1]))
                operands.append(_per_channel_constant(array, axis, first) if self.masked else None)
                continue
            channel_axis = len(value.shape) - first.rank + 1 if value.shape is not None else None
            if channel_axis is not None and (channel_axis < 0 or value.shape[channel_axis] == 1):
                operands.append(np.full((first.channels, 1), np.nan))  # broadcast over the channels, not constant
                continue
            other = self.opaque(value, f"{_producer_text(value)}")
            if other is None:
                raise _Blocked(f"meet '{value.name}' of unknown shape in {_describe(node)}")
            self._tie(node, first, other)
            operands.append(self.constants[value][:, None] if self.masked else None)
        self.layouts[output] = first
        if self.masked:
            with np.errstate(all="ignore"):
                result = _ELEMENTWISE[node.op_type]([np.broadcast_to(x, (first.channels, 1)) for x in operands])
            self.constants[output] = np.asarray(result, dtype=np.float64).reshape(first.channels)

    def _tie(self, node: ir.Node, first: _Layout, other: _Layout) -> None:
        shapes = [length for _, length in first.segments], [length for _, length in other.segments]
        if shapes[0] != shapes[1] or first.block != other.block or first.rank != other.rank:
            self.block(first, f"are combined by {_describe(node)} with channels grouped differently")
            self.block(other, f"are combined by {_describe(node)} with channels grouped differently")
            return
        for (a, _), (b, _) in zip(first.segments, other.segments, strict=True):
            self.union(a, b, _describe(node))

    def _concat(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        rank = self.layouts[region[0][1]].rank
        axis = node.attributes.get_int("axis", 1) % rank
        if axis != 1:
            raise _Blocked(f"are concatenated by {_describe(node)} on axis {axis}, not the channel axis")
        layouts = []
        for value in node.inputs:
            layout = self.layouts.get(value) if value is not None else None
            if layout is None and value is not None:
                layout = self.opaque(value, _producer_text(value))
            if layout is None:
                raise _Blocked(f"are concatenated by {_describe(node)} with a value of unknown shape")
            layouts.append(layout)
        if len({layout.block for layout in layouts}) != 1 or len({layout.rank for layout in layouts}) != 1:
            raise _Blocked(f"are concatenated by {_describe(node)} with differently flattened values")
        segments = tuple(segment for layout in layouts for segment in layout.segments)
        self.layouts[node.outputs[0]] = _Layout(segments, rank, layouts[0].block)
        if self.masked:
            self.constants[node.outputs[0]] = np.concatenate([self.constants[value] for value in node.inputs])

    def _flatten(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        value = self._only_data_input(node, region)
        layout = self.layouts[value]
        shape, output_shape = value.shape, node.outputs[0].shape
        if shape is None or output_shape is None or not all(isinstance(dim, int) for dim in (*shape, *output_shape)):
            raise _Blocked(f"are reshaped by {_describe(node)} with unknown static shapes")
        keeps_channels = len(output_shape) >= 2 and output_shape[0] == shape[0]
        if node.op_type == "Flatten" and node.attributes.get_int("axis", 1) % max(len(shape), 1) != 1:
            keeps_channels = False
        if node.op_type == "Squeeze":
            keeps_channels = keeps_channels and output_shape[1] == shape[1]
        elif keeps_channels:  # Flatten / Reshape: only (N, C, ...) -> (N, C * H * W)
            keeps_channels = len(output_shape) == 2 and output_shape[1] == math.prod(shape[1:])
        if not keeps_channels:
            raise _Blocked(f"are reshaped by {_describe(node)} to {tuple(output_shape)}, not flattened")
        if node.op_type == "Reshape":
            target = self.constant(node.inputs[1]) if len(node.inputs) > 1 else None
            if target is None:
                raise _Blocked(f"are reshaped by {_describe(node)} to a shape that is not constant")
            if target.reshape(-1)[1] > 0:
                self.reshapes.append(node)
        block = layout.block * (math.prod(shape[2:]) if len(output_shape) == 2 else 1)
        self.layouts[node.outputs[0]] = _Layout(layout.segments, len(output_shape), block)
        if self.masked:
            self.constants[node.outputs[0]] = self.constants[value]

    def _dense(self, node: ir.Node, region: list[tuple[int, ir.Value]]) -> None:
        value = self._only_data_input(node, region)
        if self.layouts[value].rank != 2:
            raise _Blocked(f"are read by {_describe(node)} on a rank-{self.layouts[value].rank} value")
        weight = self.constant(node.inputs[1])
        if weight is None or weight.ndim != 2:
            raise _Blocked(f"are read by {_describe(node)}, whose weight is not a constant matrix")
        if node.op_type == "Gemm":
            if node.attributes.get_int("transA", 0):
                raise _Blocked(f"are read by {_describe(node)} with transA=1")
            if len(node.inputs) > 2 and node.inputs[2] is not None and self.constant(node.inputs[2]) is None:
                raise _Blocked(f"are read by {_describe(node)}, whose C is not a constant")
        self.sinks.append(_Sink("gemm" if node.op_type == "Gemm" else "matmul", node, value))


class _Blocked(Exception):
    """The channels met something that stops them from shrinking; the message says what."""


def _apply(function: Callable, constants: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.asarray(function(constants), dtype=np.float64)


def _padded(node: ir.Node) -> bool:
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return True
    return any(node.attributes.get_ints("pads", ()) or ())


def _per_channel_constant(array: np.ndarray, axis: int, layout: _Layout) -> np.ndarray:
    """(C, 1) float64 of a broadcast constant when it is uniform within each channel, else NaN."""
    array = array.astype(np.float64)
    if array.size == 1:
        return np.full((layout.channels, 1), float(array.reshape(())))
    if axis < 0 or layout.block != 1 or any(dim != 1 for position, dim in enumerate(array.shape) if position != axis):
        return np.full((layout.channels, 1), np.nan)
    return np.broadcast_to(array.reshape(-1, 1), (layout.channels, 1))


def _producer_text(value: ir.Value) -> str:
    producer = value.producer()
    if producer is None:
        return f"'{value.name}'"
    return f"{_describe(producer)}"


# --------------------------------------------------------------------------
# Decisions: which channels each tied group keeps.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    """One group's decision: kept channel indices, and per-source fusion matrices (fuse mode)."""

    keep: np.ndarray
    sources: list[ir.Node]
    distributions: dict[ir.Node, np.ndarray | None]  # None: plain selection (masked mode)


def _decide(analysis: _Analysis, config: FuseFiltersPass) -> dict[int, _Plan]:
    members: dict[int, list[int]] = {}
    for space in range(len(analysis.spaces)):
        members.setdefault(analysis.root(space), []).append(space)
    excluded = set(config.exclude)
    plans: dict[int, _Plan] = {}
    for root, spaces in members.items():
        sources = [analysis.spaces[space].source for space in spaces if analysis.spaces[space].source is not None]
        if not sources:
            continue
        group = analysis.groups[root]
        reasons = list(group.reasons)
        opaque = [analysis.spaces[space].origin for space in spaces if analysis.spaces[space].source is None]
        reasons += [f"include {origin}, which cannot be pruned" for origin in opaque]
        excluded_here = [node for node in sources if _node_name(node) in excluded]
        reasons += [f"include {_describe(node)}, which is excluded" for node in excluded_here]
        if reasons:
            _log_skips(sources, opaque, group, reasons, excluded_here)
            continue
        channels = analysis.spaces[root].channels
        if config.mode == "masked":
            plan = _masked_plan(analysis, root, sources, channels, config.min_channels)
        else:
            plan = _fuse_plan(sources, analysis, channels, config)
        if plan is not None:
            plans[root] = plan
            logger.info(
                "%s: %d -> %d output channels%s",
                ", ".join(_describe(node) for node in sources),
                channels,
                len(plan.keep),
                f" (tied by {', '.join(group.ties)})" if group.ties else "",
            )
    return plans


def _log_skips(
    sources: list[ir.Node], opaque: list[str], group: _Group, reasons: list[str], excluded: list[ir.Node]
) -> None:
    for node in sources:
        if node in excluded:
            logger.info("%s skipped: excluded by the exclude option", _describe(node))
            continue
        others = [_describe(other) for other in sources if other is not node] + opaque
        if others:
            logger.info(
                "%s skipped: its output reaches a residual %s tied to %s; the tied channels %s",
                _describe(node),
                ", ".join(group.ties) or "op",
                ", ".join(others),
                "; ".join(reasons),
            )
        else:
            logger.info("%s skipped: its output channels %s", _describe(node), "; ".join(reasons))


def _fuse_plan(sources: list[ir.Node], analysis: _Analysis, channels: int, config: FuseFiltersPass) -> _Plan | None:
    ratio = min(config.layer_ratios.get(_node_name(node), config.ratio) for node in sources)
    keep = keep_count(channels, ratio, config.min_channels)
    if keep >= channels:
        logger.debug("%s: ratio %g keeps all %d channels", _describe(sources[0]), ratio, channels)
        return None
    distributions: dict[ir.Node, np.ndarray | None] = {}
    importance = np.zeros(channels)
    for node in sources:
        weight = analysis.constant(node.inputs[1])
        distributions[node] = similarity_distribution(weight, config.temperature)
        importance += kl_importance(distributions[node])
    return _Plan(select_filters(importance, keep), sources, distributions)


def _masked_plan(analysis: _Analysis, root: int, sources: list[ir.Node], channels: int, min_channels: int) -> _Plan | None:
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
    return _Plan(np.flatnonzero(keep_mask), sources, dict.fromkeys(sources))


def _foldable(analysis: _Analysis, sink: _Sink, constants: np.ndarray) -> np.ndarray:
    """Per input channel of the sink: constant, and its constant folds exactly into the sink's bias."""
    constant = ~np.isnan(constants)
    zero = constants == 0
    if sink.kind == "conv":
        return zero | (constant & (not _padded(sink.node)))
    if sink.kind == "gemm":
        return zero | (constant & (sink.node.attributes.get_float("beta", 1.0) != 0))
    return zero


# --------------------------------------------------------------------------
# Rewriting: slice every tensor the analysis tied to a shrunk space.
# --------------------------------------------------------------------------


class _Rewriter:
    def __init__(self, model: ir.Model, analysis: _Analysis, plans: dict[int, _Plan]) -> None:
        self.analysis = analysis
        self.plans = plans
        self.edit = GraphEditor(model)

    def kept_channels(self, layout: _Layout) -> np.ndarray:
        parts, offset = [], 0
        for space, length in layout.segments:
            plan = self.plans.get(self.analysis.root(space))
            parts.append(offset + (plan.keep if plan is not None else np.arange(length)))
            offset += length
        return np.concatenate(parts).astype(np.int64)

    def kept_columns(self, layout: _Layout) -> np.ndarray:
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
        bias = analysis.constant(node.inputs[2]) if len(node.inputs) > 2 else None
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

    def _dense(self, sink: _Sink) -> None:
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
                c = analysis.constant(node.inputs[2]) if len(node.inputs) > 2 else None
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
            base = f"{old.name if old is not None and old.name else _node_name(node) + '_bias'}_pruned"
        self.edit.set_input(node, index, array, base)
