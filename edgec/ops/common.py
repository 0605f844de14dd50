"""What the custom ops share, each written once.

- Attributes: an op declares its attributes as a table (defaults and, for text
  attributes, the values allowed); the NumPy reference and the Relax lowering
  both read a node's attributes through it.
- The fused epilogue ``act(y)``, act one of ``none``, ``Relu`` (``max(y, 0)``)
  and ``Clip`` (``min(max(y, activation_min), activation_max)``), in its three
  forms: NumPy (references), TIR (kernels), Relax (dense fallbacks).
- The dense NCHW convolution the references compute with (float64).
- Lowering plumbing: constant inputs out of Relax exprs, static tensor
  types, emitting a pre-scheduled TIR kernel as an opaque ``call_tir`` (so
  TVM's fusion and the default schedule rules leave it alone).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from onnx.reference.op_run import OpRun

from edgec.core.errors import BuildError
from edgec.ops import DOMAIN

ACTIVATIONS = ("none", "Relu", "Clip")

# Clip bounds in TIR and Relax: float32 constants, so +-inf is clamped to the largest finite values
_FLOAT32_BOUND = 3.0e38

# TVM 0.27 keeps a "global" CPU buffer of under this many bytes on the stack, where LLVM
# keeps it in registers; a larger one, or any "local" one, becomes a
# TVMBackendAllocWorkspace call (a heap allocation) per iteration of the parallel loop,
# and a register tile is then zeroed with a memset, spilled after its reduction and
# reloaded for its epilogue. (The allocation annotation "disable_lower_builtin" would keep
# any size on the stack, but StorageRewrite drops it.) Kernels size their accumulator
# tiles under it.
STACK_TILE_BYTES = 1024

# A PrimFunc attribute marking a custom op's own kernel (the manifest's schedule column says "custom-op").
CUSTOM_KERNEL_ATTR = "edgec.custom_op_kernel"


# --------------------------------------------------------------------------
# Attributes.
# --------------------------------------------------------------------------


def text(value) -> str:
    """A text attribute as ``str`` (ONNX gives ``bytes``)."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class Attributes:
    """An op's attributes: ``defaults`` (name -> value when the node does not set it) and
    ``choices`` (name -> the values a text attribute may take). ``a | b`` joins two tables."""

    defaults: dict[str, Any]
    choices: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __or__(self, other: Attributes) -> Attributes:
        return Attributes({**self.defaults, **other.defaults}, {**self.choices, **other.choices})

    def read(self, op: str, given: dict[str, Any], error: type[Exception] = ValueError) -> types.SimpleNamespace:
        """The attributes of one ``op`` node: its ``given`` values (keys outside the table are
        ignored: TVM's importer adds its own), else the defaults; text decoded, lists as
        tuples of ints, numbers as the default's type; a text value outside its choices
        raises ``error`` naming the op."""
        values = {}
        for name, default in self.defaults.items():
            value = given.get(name)
            if value is None:
                values[name] = default
            elif isinstance(value, (bytes, str)):
                values[name] = text(value)
            elif isinstance(value, (list, tuple, np.ndarray)):
                values[name] = tuple(int(item) for item in value)
            else:
                values[name] = type(default)(value) if isinstance(default, (int, float)) else value
        for name, allowed in self.choices.items():
            if values[name] not in allowed:
                raise error(f"{op}: unknown {name} {values[name]!r}; one of {', '.join(allowed)}")
        return types.SimpleNamespace(**values)


ACTIVATION_ATTRIBUTES = Attributes(
    {"activation": "none", "activation_min": float("-inf"), "activation_max": float("inf")}, {"activation": ACTIVATIONS}
)
CONV_ATTRIBUTES = Attributes({"kernel_shape": None, "strides": (1, 1), "pads": (0, 0, 0, 0), "dilations": (1, 1), "group": 1})


class Reference(OpRun):
    """Base of the custom ops' NumPy references (``onnx.reference`` ops of the ``edgec`` domain).

    A subclass is named like its op, sets ``ATTRIBUTES`` and implements
    ``compute(attrs, *inputs) -> array``; an attribute the table does not know
    is an error, as in an op with a fixed signature.
    """

    op_domain = DOMAIN
    ATTRIBUTES: ClassVar[Attributes] = Attributes({})

    def _run(self, *inputs, **given):
        op = type(self).__name__
        unknown = sorted(set(given) - set(self.ATTRIBUTES.defaults))
        if unknown:
            raise TypeError(f"{op} has no attribute {', '.join(unknown)}; it takes {', '.join(self.ATTRIBUTES.defaults)}")
        return (self.compute(self.ATTRIBUTES.read(op, given), *inputs),)

    def compute(self, attrs: types.SimpleNamespace, *inputs) -> np.ndarray:
        raise NotImplementedError


# --------------------------------------------------------------------------
# The activation (NumPy, TIR, Relax) and the reference convolution.
# --------------------------------------------------------------------------


def apply_activation(y: np.ndarray, activation: str, low: float, high: float) -> np.ndarray:
    """``none``, ``Relu`` or ``Clip`` of ``y`` (dtype kept)."""
    if activation == "none":
        return y
    if activation == "Relu":
        return np.maximum(y, 0).astype(y.dtype)
    if activation == "Clip":
        return np.clip(y, low, high).astype(y.dtype)
    raise ValueError(f"unknown activation {activation!r}; one of {', '.join(ACTIVATIONS)}")


def activation_expr(activation: str, low: float, high: float):
    """The activation as a function PrimExpr -> PrimExpr, for a kernel's epilogue."""
    from tvm import tirx

    if activation == "none":
        return lambda value: value
    if activation == "Relu":
        return lambda value: tirx.max(value, tirx.const(0.0, "float32"))
    if activation == "Clip":
        lo = tirx.const(max(low, -_FLOAT32_BOUND), "float32")
        hi = tirx.const(min(high, _FLOAT32_BOUND), "float32")
        return lambda value: tirx.min(tirx.max(value, lo), hi)
    raise ValueError(f"unknown activation {activation!r}; one of {', '.join(ACTIVATIONS)}")


def relax_activation(expr, activation: str, low: float, high: float):
    """The activation as Relax ops (the dense fallbacks)."""
    from tvm import relax

    if activation == "Relu":
        return relax.op.nn.relu(expr)
    if activation == "Clip":
        return relax.op.clip(expr, max(low, -_FLOAT32_BOUND), min(high, _FLOAT32_BOUND))
    return expr


def conv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Output extent of a convolution along one axis; ``pad`` is both sides' padding together."""
    return (size + pad - (kernel - 1) * dilation - 1) // stride + 1


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Static geometry of one NCHW convolution: the input, the window, and the output size
    (pads in ONNX order: top, left, bottom, right). Kernels add their own fields
    (keyword-only) in a subclass."""

    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)

    @property
    def padded_height(self) -> int:
        """Rows of the input with its top and bottom padding."""
        top, _, bottom, _ = self.pads
        return self.height + top + bottom

    @property
    def padded_width(self) -> int:
        """Columns of the input with its left and right padding."""
        _, left, _, right = self.pads
        return self.width + left + right

    @property
    def out_height(self) -> int:
        top, _, bottom, _ = self.pads
        return conv_output_size(self.height, self.kernel[0], self.strides[0], top + bottom, self.dilations[0])

    @property
    def out_width(self) -> int:
        _, left, _, right = self.pads
        return conv_output_size(self.width, self.kernel[1], self.strides[1], left + right, self.dilations[1])


def conv_reference(x: np.ndarray, weight: np.ndarray, attrs: types.SimpleNamespace, what: str) -> np.ndarray:
    """:func:`conv2d_nchw` of ``x`` with a dense ``weight`` ``(O, C/group, kh, kw)`` by a conv node's
    attributes (``CONV_ATTRIBUTES``); its ``kernel_shape``, when set, must be the weight's (``what``
    names the weight in the error)."""
    if attrs.kernel_shape is not None and tuple(attrs.kernel_shape) != tuple(weight.shape[2:]):
        raise ValueError(f"kernel_shape {tuple(attrs.kernel_shape)} but {what} of {tuple(weight.shape[2:])}")
    return conv2d_nchw(x, weight, attrs.strides, attrs.pads, attrs.dilations, attrs.group)


def conv2d_nchw(
    x: np.ndarray,
    weight: np.ndarray,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
) -> np.ndarray:
    """A dense NCHW convolution in float64 (zero padding, ONNX pad order top, left, bottom, right)."""
    top, left, bottom, right = pads
    padded = np.pad(np.asarray(x, dtype=np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_channels, per_group, kh, kw = weight.shape
    sh, sw = strides
    dh, dw = dilations
    out_h = conv_output_size(padded.shape[2], kh, sh, 0, dh)
    out_w = conv_output_size(padded.shape[3], kw, sw, 0, dw)
    y = np.zeros((x.shape[0], out_channels, out_h, out_w))
    w64 = np.asarray(weight, dtype=np.float64)
    out_per_group = out_channels // group
    for g in range(group):
        outs = slice(g * out_per_group, (g + 1) * out_per_group)
        ins = slice(g * per_group, (g + 1) * per_group)
        for i in range(kh):
            for j in range(kw):
                window = padded[:, ins, i * dh : i * dh + (out_h - 1) * sh + 1 : sh, j * dw : j * dw + (out_w - 1) * sw + 1 : sw]
                y[:, outs] += np.einsum("oc,nchw->nohw", w64[outs, :, i, j], window)
    return y


# --------------------------------------------------------------------------
# Lowering plumbing.
# --------------------------------------------------------------------------


def is_cuda(target) -> bool:
    """Whether a ResolvedTarget compiles for CUDA (no custom-op kernels there: dense fallbacks)."""
    return getattr(getattr(target, "preset", None), "kind", "llvm") == "cuda"


def constant(expr, what: str) -> np.ndarray:
    """The NumPy value of a Relax constant input (initializer), or a BuildError naming it."""
    import tvm

    if not isinstance(expr, tvm.ir.expr.Constant):
        raise BuildError(f"{what} must be a constant initializer, got a computed value")
    return expr.value.numpy()


def tensor_type(expr) -> tuple[list[int], str]:
    """Static shape and dtype of a Relax tensor expr (TVM 0.27 calls struct info ``ty``)."""
    ty = expr.ty
    return [int(dim) for dim in ty.shape], str(ty.dtype)


def op_inputs(op: str, inputs: list, data: str, weights: dict[str, Any], optional: Sequence[str] = ()):
    """``(data expr, {name: NumPy array or None})`` of a custom-op call whose first
    input is the data and the others constant weights (``weights``: name -> dtype, in input
    order; names in ``optional`` may be missing). A BuildError names what is wrong."""
    names = [data, *weights]
    required = len(names) - len(optional)
    if len(inputs) < required or len(inputs) > len(names) or any(item is None for item in inputs[:required]):
        listed = ", ".join(name if name not in optional else f"[{name}]" for name in names)
        raise BuildError(f"{op} takes inputs {listed}")
    values = {}
    for index, (name, dtype) in enumerate(weights.items(), start=1):
        given = inputs[index] if index < len(inputs) else None
        values[name] = None if given is None else constant(given, f"{op}'s {name}").astype(dtype)
    return inputs[0], values


def float_input(op: str, expr, layout: str) -> list[int]:
    """The static shape of a float32 data input of ``layout`` (``NCHW``, ``(M, K)``: one
    capital per axis), or a BuildError."""
    shape, dtype = tensor_type(expr)
    if dtype != "float32" or len(shape) != sum(ch.isupper() for ch in layout):
        raise BuildError(f"{op} needs a float32 {layout} input, got {dtype} of shape {shape}")
    return shape


def emit_kernel(bb, prim_func, name: str, args, out_ty):
    """Add ``prim_func`` (already scheduled) to the module and call it.

    The kernel is marked scheduled (default schedule rules skip it), opaque
    (FuseOps does not merge it with neighbours, which would drop its schedule)
    and as a custom-op kernel (``CUSTOM_KERNEL_ATTR``).
    """
    from tvm import relax

    prim_func = (
        prim_func.without_attr("global_symbol")
        .with_attr("tirx.is_scheduled", True)
        .with_attr("op_pattern", 8)
        .with_attr(CUSTOM_KERNEL_ATTR, True)
    )
    gvar = bb.add_func(prim_func, name)
    return relax.call_tir(gvar, args, out_ty)
