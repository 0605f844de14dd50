"""Relax-level preparation for the CPU schedule library (before LegalizeOps).

The kernels of the schedule library are written for channels-last tensors:
NHWC activations and HWIO weights, so that the innermost axis of every
convolution, its epilogue and its output store is the output channel, which
is what the vector units multiply (AVX-512 16, AVX2 8, NEON 4 floats). Stages,
in order, and why:

1. fold constants    ``isnan``/``where`` on literal Clip bounds, etc. (NumPy,
                     see below), so that step 2 sees constant bounds.
2. clip as ops       TVM's ONNX importer emits Clip as ``call_tir`` of private
                     ``maximum``/``minimum`` PrimFuncs; the layout pass cannot
                     see through a ``call_tir`` and would wrap every ReLU6 in
                     two transposes. Such calls (one elementwise block
                     ``out[i] = max(x[i], c[()])``) become ``R.maximum`` /
                     ``R.minimum`` again.
2b. int8 (QDQ)       quantize(act(conv2d/matmul(dequantize, dequantize) + bias)) becomes an
                     int8 x int8 -> int32 kernel with a fused requantization
                     (qdq_integer.py; on aarch64 the int8 weights are stored as
                     int16, what its lane multiply-add reads); the per-tensor quantize/dequantize left around
                     float ops become element-wise ops (qdq_elementwise.py), so that
                     step 4 moves them to NHWC instead of wrapping them in transposes.
3. batch norm        inference BN with constant statistics becomes a per-channel
                     scale and shift, ``y = x * s + t`` with
                     ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``
                     (computed in float64, stored float32), which FuseOps then
                     fuses into the convolution's epilogue; step 5a then folds
                     the scale into a convolution's weights where one precedes it.
4. layout            ``ConvertLayout``: conv2d to NHWC/HWIO; pooling,
                     element-wise ops, concat and reductions follow. Transposes
                     remain only at the graph's edges (input, flatten). Around
                     it, ShuffleNet's channel shuffle becomes a ``take`` on the
                     channel axis and the transposes the layout pass leaves
                     around take / split / concat sink and cancel (shuffle.py).
5. fold constants    the transposed weights and reshaped BN vectors.
5a. fold scale       ``conv2d(x, W) * s`` with a constant per-output-channel ``s`` (step
                     3's BN scale) becomes ``conv2d(x, W * s)``: one multiply less per
                     output vector in the epilogue (fold_scale.py).
6. pad channels      a convolution whose output channels are not a whole
                     number of vectors (SqueezeNet's 1000 classes with 16
                     lanes) gets zero filters up to the next multiple of the
                     lanes when that wastes at most 1/8 (with AVX-512's 16 lanes
                     1/3: 24 -> 32, 40 -> 48), and a slice after it: its kernel
                     then runs on whole vectors (1.5x measured on SqueezeNet's
                     classifier with AVX-512).
6a. packed matvec    on x86, matrix-vector products (a classifier at batch 1, squeeze-excite
                     1x1 convolutions on one pixel) and 1x1 convolutions with more weight than
                     input bytes (7x7, 14x14 layers) read their weights packed by the
                     register tile's columns, the classifier's padded to whole tiles
                     (packed_matvec.py). After step 6, which pads convolutions itself.
6b. int8 dot         on a VNNI CPU, uint8 x int8 convolutions become a kernel on
                     weights packed 4 input channels per int32 lane (conv2d_int8.py).
6c. pad matmul       a float matrix product whose rows no tile of 4-8 rows divides (a ViT's 197
                     tokens) or whose columns are not whole vectors gets zero rows / columns and
                     a slice after it (pad_matmul.py). After step 6a, which takes the
                     matrix-vector products.
7. winograd          3x3 stride-1 convolutions the policy picks become Winograd
                     ones: input transform, GEMM, output transform (fused with
                     the epilogue later); weights transformed here, once
                     (winograd_graph.py). After step 6: the GEMM gets whole vectors.
7b. sparse winograd  with the same policy, 1xN block-sparse 3x3 stride-1 convolutions (edgec's
                     BlockSparseConv kernels) become block-sparse Winograd ones: the same
                     transforms around a GEMM over the kept blocks (winograd_sparse.py).
7a. packed convs     on x86, convolutions larger than 1x1 with more weight than input bytes that
                     step 7 left direct read their weights packed by the register tile's output
                     channels, as step 6a's 1x1 ones (packed_matvec.py).
8. dot product       on a CPU with ``sdot`` (CpuVector.dot_product), step 2b's int32
                     convolutions whose channels are multiples of 4 become dot-product
                     convolutions, weights repacked once (dot_graph.py). After step 6.
9. packed weights    on a CPU with a lane multiply-add, float convolutions read by lane
                     get weights packed by their register tile's output channels, so
                     that ``ldp`` pairs their loads (packed_weights.py). After step 7.

Constant folding is done in NumPy for a small table of ops: TVM's
FoldConstant compiles one LLVM kernel per op and shape, which took 30 s for a
MobileNetV2 on two cores.

No rewrite here can fail a build. Each one leaves alone the op it cannot
handle (the NumPy folder an op it cannot evaluate, BN a batch norm whose
statistics it cannot read, the layout pass an op whose layout rules break,
see layout.py) and records a fallback naming the op and its shapes; a pass
that fails as a whole is skipped, the module it got passed on unchanged
(``guarded``), and recorded with the kernel ``*``. Later passes and the
schedule library then see the original op, which TVM's default lowering
computes correctly.
"""

from __future__ import annotations

import logging

import numpy as np

from edgec.core.fallbacks import FallbackLog
from edgec.targets.schedules.common import MAX_PADDING_FRACTION, padded_channels, static_shape
from edgec.targets.schedules.guard import describe_call, guarded

log = logging.getLogger(__name__)

# channels-last for every 2-D convolution; everything else follows the data
DESIRED_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


def graph_passes(
    lanes: int | None = None, fallbacks: FallbackLog | None = None, winograd=None, lane_fma: bool = False,
    int8_dot: bool = False,
    dot_product: bool = False, packed_weights=None, pair_product: bool = False, packed_matvec=None, vector=None,
) -> list:
    """The Relax passes above, in order, each guarded; ``lanes`` (float32 per vector) enables
    step 6, ``winograd`` (a WinogradPolicy) step 7; ``fallbacks`` receives what a rewrite left alone;
    ``lane_fma`` (the CPU multiplies by a lane): int16 integer-kernel weights (step 2b);
    ``int8_dot`` (VNNI): int8 convolutions on packed weights (step 6b, conv2d_int8.py);
    ``dot_product`` (the CPU has ``sdot``): step 8; ``pair_product`` (aarch64 without it): step 8
    with pair products (conv2d_pair.py); ``packed_weights`` (a CpuVector with a lane
    multiply-add): step 9 and step 7's GEMM weights packed likewise; ``packed_matvec`` (a
    CpuVector): step 6a; ``vector`` (a CpuVector): step 7b with ``winograd``."""
    from tvm import relax

    from edgec.targets.schedules.layout import convert_layout
    from edgec.targets.schedules import fold_scale, qdq_elementwise, qdq_integer, shuffle

    fallbacks = fallbacks if fallbacks is not None else FallbackLog()
    passes = [
        ("graph:fold-constants", numpy_fold_constants(fallbacks)),
        ("graph:clip", clip_as_relax_ops(fallbacks)),
        (qdq_integer.RULE, qdq_integer.qdq_integer(fallbacks, qdq_integer.weight_dtype(lane_fma))),
        (qdq_elementwise.RULE, qdq_elementwise.qdq_elementwise(fallbacks)),
        ("graph:batch-norm", batch_norm_as_scale_shift(fallbacks)),
        ("graph:fold-constants", numpy_fold_constants(fallbacks)),
        (shuffle.RULE, shuffle.channel_shuffle_as_take(fallbacks)),
        ("graph:layout", convert_layout(DESIRED_LAYOUTS, fallbacks)),
        (shuffle.RULE, shuffle.sink_transposes()),
        ("graph:fold-constants", numpy_fold_constants(fallbacks)),
        (fold_scale.RULE, fold_scale.fold_scale_into_weights(fallbacks)),
    ]
    if lanes and lanes > 1:
        passes.append(("graph:pad-channels", pad_output_channels(lanes, fallbacks)))
    if packed_matvec is not None:
        from edgec.targets.schedules import packed_matvec as matvec

        passes.append((matvec.RULE, matvec.packed_matvec(packed_matvec, fallbacks)))
    if int8_dot:
        from edgec.targets.schedules.conv2d_int8 import RULE as INT8_DOT, int8_dot_conv2d

        passes.append((INT8_DOT, int8_dot_conv2d(fallbacks)))
    if lanes and lanes > 1:
        from edgec.targets.schedules import pad_matmul

        passes.append((pad_matmul.RULE, pad_matmul.pad_matmul(lanes, fallbacks)))
    if winograd is not None:
        from edgec.targets.schedules.winograd_graph import RULE, winograd_conv2d

        passes.append((RULE, winograd_conv2d(winograd, fallbacks, packed_weights)))
        if vector is not None:
            from edgec.targets.schedules import winograd_sparse

            passes.append((winograd_sparse.RULE, winograd_sparse.block_sparse_winograd(winograd, vector, fallbacks)))
    if packed_matvec is not None:
        from edgec.targets.schedules import packed_matvec as matvec

        passes.append((matvec.RULE, matvec.packed_spatial_convolutions(packed_matvec, fallbacks)))
    if dot_product or pair_product:
        from edgec.targets.schedules import dot_graph

        passes.append((dot_graph.RULE, dot_graph.dot_product_conv2d(fallbacks, pair=not dot_product)))
    if packed_weights is not None:
        from edgec.targets.schedules import packed_weights as packing

        passes.append((packing.RULE, packing.packed_weights_conv2d(packed_weights, fallbacks)))
    passes.append(("graph:dead-code", relax.transform.DeadCodeElimination()))
    return [guarded(inner, rule, fallbacks) for rule, inner in passes]


# --- 1 and 5: constant folding in NumPy ------------------------------------------------------

def _binary(function):
    return lambda call, values: function(values[0], values[1])


def _reshape(call, values):
    return values[0].reshape([int(dim) for dim in call.ty.shape])


def _permute(call, values):
    axes = call.attrs.axes
    return np.transpose(values[0], None if axes is None else [int(axis) for axis in axes])


# op name -> f(call, [numpy arguments]) -> numpy result (cast to the call's dtype afterwards)
_FOLDERS = {
    "relax.add": _binary(np.add),
    "relax.subtract": _binary(np.subtract),
    "relax.multiply": _binary(np.multiply),
    "relax.divide": _binary(np.divide),
    "relax.maximum": _binary(np.maximum),
    "relax.minimum": _binary(np.minimum),
    "relax.sqrt": lambda call, values: np.sqrt(values[0]),
    "relax.isnan": lambda call, values: np.isnan(values[0]),
    "relax.where": lambda call, values: np.where(values[0], values[1], values[2]),
    "relax.reshape": _reshape,
    "relax.expand_dims": _reshape,
    "relax.squeeze": _reshape,
    "relax.permute_dims": _permute,
    "relax.astype": lambda call, values: values[0],
    "relax.broadcast_to": lambda call, values: np.broadcast_to(values[0], [int(d) for d in call.ty.shape]),
}


def _constant_value(expr, known: dict):
    """The NumPy value of ``expr`` when it is a constant (or a var bound to one), else None."""
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Var) and expr in known:
        return known[expr]
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    if isinstance(expr, relax.ShapeExpr):
        return expr  # shape arguments (reshape) are read from the call's type instead
    return None


def _fold_call(call, known: dict):
    """A relax constant for ``call`` when it is a foldable op of constants, else None."""
    import tvm
    from tvm import relax

    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
        return None
    folder = _FOLDERS.get(call.op.name)
    shape = static_shape(call.ty)
    if folder is None or shape is None or not hasattr(call.ty, "dtype"):
        return None
    values = [_constant_value(arg, known) for arg in call.args]
    if any(value is None for value in values):
        return None
    dtype = str(call.ty.dtype)
    result = np.asarray(folder(call, values)).astype(dtype)
    if list(result.shape) != shape:
        return None
    return relax.const(np.require(result, requirements="C"), dtype)


def numpy_fold_constants(fallbacks: FallbackLog | None = None):
    """Replace calls of ``_FOLDERS`` ops whose arguments are all constants by their value;
    a call NumPy cannot evaluate stays (computed at run time) and is recorded."""
    import tvm
    from tvm import relax

    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    @relax.expr_functor.mutator
    class _Folder(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            known = {}
            for arg in call.args:
                if isinstance(arg, relax.Var):
                    bound = self.lookup_binding(arg)
                    if isinstance(bound, tvm.ir.expr.Constant):
                        known[arg] = bound.value.numpy()
            try:
                folded = _fold_call(call, known)
            except Exception as error:  # noqa: BLE001 - NumPy refused: leave the op to run time
                fallbacks.add(describe_call(call), "graph:fold-constants", error, "computed at run time")
                return call
            return call if folded is None else folded

    @relax.transform.function_pass(opt_level=0, name="EdgecNumpyFoldConstants")
    def _fold(func, mod, _ctx):
        return _Folder(mod).visit_expr(func)

    return tvm.transform.Sequential([_fold, relax.transform.CanonicalizeBindings()])


# --- 2: Clip back to relax.maximum / relax.minimum ------------------------------------------

def elementwise_clip_kind(func) -> str | None:
    """``"max"``/``"min"`` when ``func`` is one block ``out[i...] = max/min(x[i...], c[()])``."""
    import tvm
    from tvm import s_tir, tirx

    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 3:
        return None
    schedule = s_tir.Schedule(func)
    blocks = schedule.get_child_blocks(schedule.get_sblock("root"))
    if len(blocks) != 1:
        return None
    store = schedule.get(blocks[0]).body
    if not isinstance(store, tirx.BufferStore):
        return None
    value = store.value
    for kind, node in (("max", tirx.Max), ("min", tirx.Min)):
        if not isinstance(value, node):
            continue
        loads = [value.a, value.b]
        if not all(isinstance(load, tvm.ir.TensorLoad) for load in loads):
            return None
        scalar, tensor = sorted(loads, key=lambda load: len(load.indices))
        if len(scalar.indices) == 0 and len(tensor.indices) == len(store.indices) and all(
            a.same_as(b) for a, b in zip(tensor.indices, store.indices, strict=True)
        ):
            return kind
    return None


def clip_as_relax_ops(fallbacks: FallbackLog | None = None):
    import tvm
    from tvm import relax
    from tvm.relax.dpl import GlobalVarPattern, TuplePattern, is_op, rewrite_call, wildcard

    callee, tensor, bound = GlobalVarPattern(), wildcard(), wildcard()
    pattern = is_op("relax.call_tir")(callee, TuplePattern([tensor, bound]))
    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    @tvm.transform.module_pass(opt_level=0, name="EdgecClipAsRelaxOps")
    def _pass(mod, _ctx):
        def rewriter(expr, matches):
            try:
                kind = elementwise_clip_kind(mod[matches[callee]])
            except Exception as error:  # noqa: BLE001 - an unexpected PrimFunc: keep the call_tir
                fallbacks.add(describe_call(expr), "graph:clip", error, "kept as TVM imported it")
                return expr
            if kind is None:
                log.debug("call_tir %s is not an element-wise max/min with a scalar: kept", matches[callee].name_hint)
                return expr
            op = relax.op.maximum if kind == "max" else relax.op.minimum
            return op(matches[tensor], matches[bound])

        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gvar] = rewrite_call(pattern, rewriter, func)
        return relax.transform.DeadCodeElimination()(mod)

    return _pass


# --- 3: inference batch norm as a per-channel scale and shift -------------------------------

def batch_norm_scale_shift(gamma, beta, mean, var, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """``y = (x - mean) / sqrt(var + eps) * gamma + beta`` as ``y = x * scale + shift``."""
    inv_std = 1.0 / np.sqrt(var.astype(np.float64) + epsilon)
    scale = gamma.astype(np.float64) * inv_std
    shift = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return scale.astype(gamma.dtype), shift.astype(beta.dtype)


def batch_norm_as_scale_shift(fallbacks: FallbackLog | None = None):
    from tvm import relax
    from tvm.relax.dpl import TupleGetItemPattern, is_const, is_op, rewrite_call, wildcard

    data = wildcard()
    gamma, beta, mean, var = is_const(), is_const(), is_const(), is_const()
    norm = is_op("relax.nn.batch_norm")(data, gamma, beta, mean, var)
    pattern = TupleGetItemPattern(norm, 0)
    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    def rewriter(expr, matches):
        try:
            return scale_shift(matches)
        except Exception as error:  # noqa: BLE001 - unexpected attributes or shapes: keep the batch norm
            fallbacks.add(describe_call(matches[norm]), "graph:batch-norm", error, "kept as relax.nn.batch_norm")
            return expr

    def scale_shift(matches):
        attrs = matches[norm].attrs
        ndim = len(matches[data].ty.shape)
        axis = int(attrs.axis) % ndim
        scale, shift = batch_norm_scale_shift(
            *(matches[p].value.numpy() for p in (gamma, beta, mean, var)), float(attrs.epsilon)
        )
        shape = [1] * ndim
        shape[axis] = -1
        dtype = str(matches[data].ty.dtype)
        scaled = relax.op.multiply(matches[data], relax.const(scale.reshape(shape), dtype))
        return relax.op.add(scaled, relax.const(shift.reshape(shape), dtype))

    @relax.transform.function_pass(opt_level=0, name="EdgecBatchNormAsScaleShift")
    def _pass(func, _mod, _ctx):
        return rewrite_call(pattern, rewriter, func)

    return _pass


# --- 6: output channels padded to whole vectors -------------------------------------------------

# vectors of at least this many float32 lanes (AVX-512) pad a convolution's output channels when
# that adds at most WIDE_PADDING_FRACTION of its work: 24 -> 32 and 40 -> 48 channels. Unpadded,
# 24 channels ran as 8-lane (half-vector) multiply-adds; alone, one thread: 56x56x144 -> 24 0.22 ms,
# -> 32 0.17; 56x56x96 -> 24 0.143, -> 32 0.112; 28x28x240 -> 40 0.136, -> 48 0.107.
WIDE_LANES = 16
WIDE_PADDING_FRACTION = 1 / 3


def pad_output_channels(lanes: int, fallbacks: FallbackLog | None = None):
    """``conv2d(x, w)`` (NHWC/HWIO, groups 1, constant w with F output channels) ->
    ``strided_slice(conv2d(x, w padded with zero filters to F'), channels [0, F))``."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    data, weight = wildcard(), is_const()
    conv = is_op("relax.nn.conv2d")(data, weight)
    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    def rewriter(expr, matches):
        try:
            return padded(expr, matches)
        except Exception as error:  # noqa: BLE001 - keep the convolution as it is
            fallbacks.add(describe_call(expr), "graph:pad-channels", error, "left unpadded")
            return expr

    def padded(expr, matches):
        attrs = matches[conv].attrs
        layouts = (attrs.data_layout, attrs.kernel_layout, attrs.out_layout, int(attrs.groups))
        if layouts != ("NHWC", "HWIO", "NHWC", 1):
            log.debug("conv2d %s: channel padding only handles NHWC/HWIO groups=1", layouts)
            return expr
        kernel = matches[weight].value.numpy()
        channels = kernel.shape[3]
        padded = padded_channels(channels, lanes, WIDE_PADDING_FRACTION if lanes >= WIDE_LANES else MAX_PADDING_FRACTION)
        if padded is None:
            return expr  # whole vectors already, or padding would waste too much
        log.debug("conv2d with %d output channels padded to %d (%d lanes)", channels, padded, lanes)
        wider = np.zeros((*kernel.shape[:3], padded), dtype=kernel.dtype)
        wider[..., :channels] = kernel
        out = relax.Call(matches[conv].op, [matches[data], relax.const(wider, str(kernel.dtype))], attrs)
        return relax.op.strided_slice(out, axes=[3], begin=[0], end=[channels])

    @relax.transform.function_pass(opt_level=0, name="EdgecPadOutputChannels")
    def _pass(func, _mod, _ctx):
        return rewrite_call(conv, rewriter, func)

    return _pass
