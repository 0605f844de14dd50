"""Relax lowerings of ``edgec.BinaryConv`` and ``edgec.BinaryGemm`` (and the weight-only
path ternary layers share).

Binary activations (CPU): ``edgec_binary_pack`` + ``edgec_xnor_conv``
(edgec/ops/binary/kernels.py). A Gemm with binary activations is run by the
same two kernels as a 1x1 convolution over a row of ``M`` positions (``A``
transposed to ``(1, K, 1, M)``).

Weight-only (``binarize_input="none"``, and every ternary layer): the packed
weights stay packed in the artifact and are decoded at run time by
``edgec_binary_decode`` / ``edgec_ternary_decode`` into float32 ``scale * u``
in HWIO layout (the layout the CPU conv schedules want), followed by Relax's
own ``conv2d`` / ``matmul``: the float convolution costs what it costs in
float, plus the decode (:func:`decoded_weight`).

CUDA has no kernel for coded weights here: the weights are decoded at compile
time and the op lowers to dense Relax ops (a warning is logged).
"""

from __future__ import annotations

import logging

import numpy as np

from edgec.core.errors import BuildError
from edgec.ops.binary.format import WeightCode, binary_code, decode_bits, float_weight_hwio, weight_words
from edgec.ops.binary.kernels import ConvShape, decode_kernel, pack_kernel, xnor_conv_kernel, xnor_plan
from edgec.ops.binary.reference import BinaryConv, BinaryGemm
from edgec.ops.common import emit_kernel, float_input, is_cuda, op_inputs, relax_activation, tensor_type
from edgec.targets.vector import cpu_vector

log = logging.getLogger(__name__)

__all__ = [
    "coded_inputs",
    "decoded_weight",
    "emit_float_conv",
    "emit_float_gemm",
    "emit_xnor_conv",
    "lower_binary_conv",
    "lower_binary_gemm",
]


def relax_binarize(expr, mode: str):
    """``b(x)`` as Relax ops (the CUDA fallback)."""
    from tvm import relax

    if mode == "sign":
        return relax.op.sign(expr)
    if mode == "sign_ge0":
        positive = relax.op.greater_equal(expr, relax.const(0.0, "float32"))
        return relax.op.where(positive, relax.const(1.0, "float32"), relax.const(-1.0, "float32"))
    return expr


def emit_xnor_conv(bb, x, shape: ConvShape, bits, scale, bias, attrs, target):
    """Emit pack + popcount kernels for a binary-activation convolution; returns the output expr."""
    from tvm import relax

    vector = cpu_vector(target)
    plan = xnor_plan(shape, vector)
    log.info(
        "BinaryConv %dx%d %d->%d at %dx%d: %d-bit words, %d per vector (%s), tile %d channels x %d columns",
        *shape.kernel, shape.channels, shape.out_channels, shape.height, shape.width,
        plan.word_bits, plan.lanes, vector.popcount, plan.out_tile, plan.column_tile,
    )  # fmt: skip
    planes_type = relax.TensorType([shape.batch, *plan.plane_shape], plan.dtype)
    base_type = relax.TensorType([shape.batch, shape.out_height, plan.padded_width], "int32")
    pack = pack_kernel(shape, plan, attrs.binarize_input, attrs.encoding)
    packed = bb.emit(emit_kernel(bb, pack, "edgec_binary_pack", [x], [planes_type, base_type]))
    planes, base = (bb.emit(relax.TupleGetItem(packed, index)) for index in range(2))
    words = weight_words(bits, shape.channels, attrs.encoding, plan.word_bits)
    kernel = xnor_conv_kernel(shape, plan, attrs.encoding, attrs.activation, attrs.activation_min, attrs.activation_max)
    kernel = kernel.with_attr("edgec.flops", 2.0 * shape.multiply_adds)
    out_type = relax.TensorType([shape.batch, shape.out_channels, shape.out_height, shape.out_width], "float32")
    args = [planes, base, relax.const(words), relax.const(scale), relax.const(bias)]
    return emit_kernel(bb, kernel, "edgec_xnor_conv", args, out_type)


def decoded_weight(bb, op: str, anchor, bits_oc, channels: int, scale, code: WeightCode, target, reshape=None):
    """The float32 weight of packed bits ``(planes, O, kh, kw, ceil(C/8))`` read by ``code``,
    HWIO or ``reshape``d: decoded at run time by ``edgec_{code.name}_decode`` (CPU; ``anchor``
    is the layer's input, see :func:`~edgec.ops.binary.kernels.decode_kernel`), at compile
    time on CUDA (with a warning)."""
    from tvm import relax

    _, out_channels, kh, kw, _ = bits_oc.shape
    if is_cuda(target):
        log.warning("%s on %s: no GPU kernel for coded weights, weights decoded to float32 at compile time", op, target.spec)
        weight = float_weight_hwio(bits_oc, channels, scale, code)
        return relax.const(weight if reshape is None else weight.reshape(reshape))
    anchor_shape, _ = tensor_type(anchor)
    prim = decode_kernel(anchor_shape, (kh, kw), channels, out_channels, code)
    args = [anchor, relax.const(decode_bits(bits_oc, channels)), relax.const(scale)]
    out_type = relax.TensorType([kh, kw, channels, out_channels], "float32")
    weight = bb.emit(emit_kernel(bb, prim, f"edgec_{code.name}_decode", args, out_type))
    return weight if reshape is None else bb.emit(relax.op.reshape(weight, list(reshape)))


def emit_float_conv(bb, x, weight_hwio, attrs, bias, mode: str = "none"):
    """``act(conv2d(b(x), w) + bias)`` with Relax ops; ``weight_hwio`` a Relax expr (HWIO)."""
    from tvm import relax

    conv = relax.op.nn.conv2d(
        relax_binarize(x, mode), weight_hwio, strides=attrs.strides, padding=attrs.pads, dilation=attrs.dilations,
        groups=attrs.group, data_layout="NCHW", kernel_layout="HWIO",
    )  # fmt: skip
    if bias is not None:
        conv = relax.op.add(conv, relax.const(np.asarray(bias, np.float32).reshape(1, -1, 1, 1)))
    return relax_activation(conv, attrs.activation, attrs.activation_min, attrs.activation_max)


def emit_float_gemm(bb, a, weight_kn, attrs, bias, mode: str = "none"):
    """``act(b(A) @ w + bias)`` with Relax ops; ``weight_kn`` a Relax expr ``(K, N)``."""
    from tvm import relax

    y = relax.op.matmul(relax_binarize(a, mode), weight_kn)
    if bias is not None:
        y = relax.op.add(y, relax.const(np.asarray(bias, np.float32).reshape(1, -1)))
    return relax_activation(y, attrs.activation, attrs.activation_min, attrs.activation_max)


CODED_WEIGHTS = {"weight_bits": np.uint8, "scale": np.float32, "bias": np.float32}


def coded_inputs(op: str, inputs, layout: str):
    """(data, its shape, weight bits, scale, bias or None) of a Binary*/Ternary* call."""
    data, weights = op_inputs(op, inputs, "x" if layout == "NCHW" else "A", CODED_WEIGHTS, optional=("bias",))
    return data, float_input(op, data, layout), weights["weight_bits"], weights["scale"], weights["bias"]


def lower_binary_conv(bb, inputs, attrs, target):
    """Binary activations: pack + xnor/popcount kernels; weight-only: run-time decode + conv2d."""
    x, x_shape, bits, scale, bias = coded_inputs("BinaryConv", inputs, "NCHW")
    attrs = BinaryConv.ATTRIBUTES.read("BinaryConv", attrs, BuildError)
    out_channels, kh, kw, _ = bits.shape
    if not is_cuda(target):
        bias = np.zeros(out_channels, np.float32) if bias is None else bias
        if attrs.binarize_input != "none":
            if attrs.group != 1:
                raise BuildError("BinaryConv with binary activations needs group=1 (the pass lowers grouped convs weight-only)")
            shape = ConvShape(
                batch=x_shape[0], channels=x_shape[1], height=x_shape[2], width=x_shape[3], out_channels=out_channels,
                kernel=(kh, kw), strides=attrs.strides, pads=attrs.pads, dilations=attrs.dilations,
            )  # fmt: skip
            return emit_xnor_conv(bb, x, shape, bits, scale, bias, attrs, target)
    weight = decoded_weight(
        bb, "BinaryConv", x, bits[None], x_shape[1] // attrs.group, scale, binary_code(attrs.encoding), target
    )
    return emit_float_conv(bb, x, weight, attrs, bias, attrs.binarize_input)


def lower_binary_gemm(bb, inputs, attrs, target):
    """Binary activations: the conv kernels on ``A^T`` as a 1x1 conv over M positions;
    weight-only: run-time decode + matmul."""
    from tvm import relax

    a, (rows, depth), bits, scale, bias = coded_inputs("BinaryGemm", inputs, "(M, K)")
    attrs = BinaryGemm.ATTRIBUTES.read("BinaryGemm", attrs, BuildError)
    out_features = bits.shape[0]
    bits4 = bits.reshape(out_features, 1, 1, -1)
    if attrs.binarize_input != "none" and not is_cuda(target):
        bias = np.zeros(out_features, np.float32) if bias is None else bias
        x = bb.emit(relax.op.reshape(relax.op.permute_dims(a, [1, 0]), [1, depth, 1, rows]))
        shape = ConvShape(batch=1, channels=depth, height=1, width=rows, out_channels=out_features, kernel=(1, 1))
        y = bb.emit(emit_xnor_conv(bb, x, shape, bits4, scale, bias, attrs, target))
        return relax.op.permute_dims(relax.op.reshape(y, [out_features, rows]), [1, 0])
    code = binary_code(attrs.encoding)
    weight = decoded_weight(bb, "BinaryGemm", a, bits4[None], depth, scale, code, target, (depth, out_features))
    return emit_float_gemm(bb, a, weight, attrs, bias, attrs.binarize_input)
