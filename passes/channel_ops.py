"""What the ops that carry channels do to a per-channel constant (NumPy, float64).

The channel analysis (passes/channel_analysis.py) follows Conv output
channels through these ops; when it tracks constant channels (zero-channel
removal), each table entry maps the op to a function of a float64 array of
per-channel constants (NaN: not constant):

- ``UNARY``: element-wise ops of one data input (``op -> (node, constant) ->
  function``, None when the op's parameters are not constant);
- ``ELEMENTWISE``: ops of several broadcast operands (``Add``, ``Mul``, ...);
- ``POOLS`` and ``REDUCES``: ops that keep each channel's values within it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

__all__ = ["ELEMENTWISE", "POOLS", "REDUCES", "UNARY", "apply_elementwise", "zero_filters"]


def zero_filters(weight: np.ndarray) -> np.ndarray:
    """Boolean (C,): filter k (axis 0) is exactly zero."""
    weight = np.asarray(weight)
    return ~np.any(weight.reshape(weight.shape[0], -1) != 0, axis=1)


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
UNARY: dict[str, Callable] = {
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
ELEMENTWISE: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {
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
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceMin"})


def apply_elementwise(function: Callable, constants: np.ndarray) -> np.ndarray:
    """``function`` of per-channel constants, float64, NaN where undefined (no warnings)."""
    with np.errstate(all="ignore"):
        return np.asarray(function(constants), dtype=np.float64)
