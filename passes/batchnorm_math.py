"""The arithmetic of folding a BatchNormalization (or a per-channel Mul/Add) into the
linear layer before it: pure NumPy, float64 inside, the caller's dtype outside.
Used by the fold-bn pass (passes/fold_batchnorm.py) and the coded-weight epilogue
(passes/weight_layers.py)."""

from __future__ import annotations

import numpy as np

__all__ = [
    "batchnorm_scale_shift",
    "fold_batchnorm",
    "fold_bias",
    "scale_output_channels",
    "scale_transposed_conv_weight",
]


def batchnorm_scale_shift(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    epsilon: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` with ``BN(y) = y * scale + shift``, in float64.

    ``scale = gamma / sqrt(running_var + epsilon)``,
    ``shift = beta - running_mean * scale``; a missing ``gamma`` is 1 and a
    missing ``beta`` is 0 (an affine-free batch norm).
    """
    inv_std = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + float(epsilon))
    scale = inv_std if gamma is None else np.asarray(gamma, dtype=np.float64) * inv_std
    shift = -np.asarray(running_mean, dtype=np.float64) * scale
    if beta is not None:
        shift = shift + np.asarray(beta, dtype=np.float64)
    return scale, shift


def scale_output_channels(weight: np.ndarray, scale: np.ndarray, channel_axis: int = 0) -> np.ndarray:
    """``weight`` with slice ``c`` along ``channel_axis`` multiplied by ``scale[c]``; dtype kept."""
    weight = np.asarray(weight)
    axis = channel_axis % weight.ndim
    shape = [1] * weight.ndim
    shape[axis] = -1
    scaled = weight.astype(np.float64) * np.asarray(scale, dtype=np.float64).reshape(shape)
    return scaled.astype(weight.dtype)


def scale_transposed_conv_weight(weight: np.ndarray, scale: np.ndarray, groups: int = 1) -> np.ndarray:
    """Scale the output channels of a ConvTranspose weight; dtype kept.

    The weight is ``(C_in, C_out / groups, k...)``: input channels
    ``[g * C_in/groups, (g+1) * C_in/groups)`` feed output channels
    ``g * C_out/groups + j``, with ``j`` indexing axis 1.
    """
    weight = np.asarray(weight)
    in_channels, out_per_group = weight.shape[0], weight.shape[1]
    kernel = weight.shape[2:]
    if in_channels % groups:
        raise ValueError(f"ConvTranspose weight has {in_channels} input channels, not divisible by groups={groups}")
    blocks = weight.astype(np.float64).reshape(groups, in_channels // groups, out_per_group, *kernel)
    per_group = np.asarray(scale, dtype=np.float64).reshape(groups, 1, out_per_group, *([1] * len(kernel)))
    return (blocks * per_group).reshape(weight.shape).astype(weight.dtype)


def fold_bias(
    bias: np.ndarray | None,
    scale: np.ndarray | None,
    shift: np.ndarray | None,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray | None:
    """``bias * scale + shift`` (missing terms left out); None when both bias and shift are.

    The result has ``bias``'s dtype, or ``dtype`` when there is no bias;
    channels are on the last axis, so a bias of shape (M, 1) or (1, N)
    broadcasts with per-channel (N,) vectors as Gemm's C does.
    """
    if bias is None and shift is None:
        return None
    out_dtype = np.asarray(bias).dtype if bias is not None else np.dtype(dtype)
    result = None if bias is None else np.asarray(bias, dtype=np.float64)
    if result is not None and scale is not None:
        result = result * np.asarray(scale, dtype=np.float64)
    if shift is not None:
        shift = np.asarray(shift, dtype=np.float64)
        result = shift if result is None else result + shift
    return np.asarray(result).astype(out_dtype)


def fold_batchnorm(
    weight: np.ndarray,
    bias: np.ndarray | None,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    epsilon: float = 1e-5,
    channel_axis: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(W', b')`` of a layer followed by a batch norm (the module docstring's equations).

    ``channel_axis`` is the output-channel axis of ``weight`` (0 for Conv,
    1 for a Gemm/MatMul ``(K, N)`` weight); a missing bias is zero. The
    results keep ``weight``'s dtype (and ``bias``'s, when given).
    """
    weight = np.asarray(weight)
    scale, shift = batchnorm_scale_shift(running_mean, running_var, gamma, beta, epsilon)
    bias = np.zeros(scale.shape, dtype=weight.dtype) if bias is None else bias
    return scale_output_channels(weight, scale, channel_axis), fold_bias(bias, scale, shift)
