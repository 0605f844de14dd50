"""Graph rewrite for x86 (``CpuVector.packed_matvec``): a matrix-vector product reads its constant
weights packed by its register tile's columns ``T``, one contiguous run per tile:

    matmul(x[1, K], W[K, N])  ->  strided_slice(matmul(x, view(P)), columns [0, N)),
        P[n / T, k, n % T] = W'[k, n],  W' = W and zero columns up to N' (a multiple of T)
    conv2d(x[1, H, W, C], W[1, 1, C, F]) with more weight bytes than input bytes (a squeeze-excite
    block's 1x1 convolutions on one pixel, the 1x1 layers at 7x7 and 14x14)  ->  conv2d(x, P),
    P[f / T, 0, 0, c, f % T] = W[0, 0, c, f]  (packed_weights.py's ``conv2d_packed``)

Why: at batch 1 such a product reads every weight once, so it runs at the speed its weights
stream from memory. In a whole inference they come from L3 or DRAM, not from the caches they sit
in when the kernel is timed alone: MobileNetV3-small's 1024 -> 1000 classifier ran 0.13 ms alone
and 0.44 ms in the run (samples of the run, ``perf record``), its 576 -> 1024 layer 0.05 and 0.15.
In ``[K, N]`` (HWIO) a tile reads ``T`` floats of a row, then ``4 N`` bytes further on the next:
one short run per 4 KiB page. Packed, a tile's weights are one stream, which the hardware
prefetchers follow. A 1024 x 1024 matrix-vector product with AVX-512 (one thread, the weights
flushed from the caches before each run): 0.36 ms unpacked, 0.12 ms packed; warm 0.079 / 0.048.
A 1x1 convolution with more weight bytes than input bytes runs weights-stationary
(``conv2d.Conv2DNHWC``): each weight tile is read once per inference, as in a matrix-vector
product, so it is packed the same way (interleaved A/B, loaded machine: MobileNetV3-small 0.87x,
EfficientNet-B0 0.97x end to end against the one-pixel rule alone).

Convolutions larger than 1x1 that stream their weights the same way (ResNet-18's 7x7x512 3x3
layers: 9.4 MB of weights for 100 KB of input; HWIO gave each tile 128 bytes every 2 KB) are
packed by ``packed_spatial_convolutions``, a second pass after the Winograd rewrite (graph.py step
7a), which keeps the 3x3 layers it takes: x86, one thread, those layers 52-66 -> 97-113 GFLOP/s,
ResNet-18 end to end 28-32 -> 22-25 ms (`edgec profile --local`, alternated, loaded machine).

The columns are padded to a whole number of tiles of ``MATVEC_VECTORS`` vectors when that wastes
at most ``common.MAX_PADDING_FRACTION`` (a 1000-class classifier: 1024 columns, tiles of 64;
unpadded its tile was 8 columns, half a vector, one accumulator), else to whole vectors. The
tile is the one ``dense.Dense`` / ``conv2d.Conv2DNHWC`` choose for the product's shape. Runs
after the channel padding (graph.py step 6), which pads a convolution's output channels itself.
"""

from __future__ import annotations

import logging

import numpy as np

from edgec.core.fallbacks import FallbackLog
from edgec.targets.schedules.common import padded_channels, register_tile
from edgec.targets.schedules.conv2d import conv_tile
from edgec.targets.schedules.packed_weights import OUT_EWISE_FUSABLE, columns_view, emit_conv2d_packed, pack_columns
from edgec.targets.schedules.te_rewrite import call_rewriter, conv2d_rewriter, explained, not_dense_nhwc, rewrite_module
from edgec.targets.vector import CpuVector

log = logging.getLogger(__name__)

RULE = "graph:packed-matvec"
MATVEC_VECTORS = 4  # dense.Dense's widest tile without a lane operand


def padded_columns(columns: int, lanes: int) -> int:
    """``columns`` rounded up to whole tiles of ``MATVEC_VECTORS`` vectors, else to whole vectors,
    where that adds at most ``common.MAX_PADDING_FRACTION`` of them; else ``columns``."""
    return padded_channels(columns, lanes * MATVEC_VECTORS) or padded_channels(columns, lanes) or columns


def matvec_tile(vector: CpuVector, data_shape, weight: np.ndarray | None) -> tuple[tuple[int, int] | None, str]:
    """((padded columns, tile), why) for ``matmul(data, weight)``; None: left alone."""
    if weight is None:
        return None, "the weights are not a constant"
    if weight.ndim != 2 or weight.dtype != np.float32:
        return None, f"weights {weight.shape} {weight.dtype}, not a float32 matrix"
    if len(data_shape) != 2 or not hasattr(data_shape[0], "value") or int(data_shape[0]) != 1:
        return None, f"data {[str(d) for d in data_shape]}: not one row"
    columns = int(weight.shape[1])
    padded = padded_columns(columns, vector.lanes)
    _, tile = register_tile([1], padded, vector)
    if tile >= padded:
        return None, f"one register tile of {tile} columns: already contiguous"
    return (padded, tile), f"{columns} columns packed by {tile}" + (f", padded to {padded}" if padded > columns else "")


def conv_matvec_tile(vector: CpuVector, call, weight: np.ndarray | None, spatial: bool = False) -> tuple[int | None, str]:
    """(output-channel tile, why) for a Relax 1x1 conv2d (any kernel size with ``spatial``) whose
    weights are streamed once (more weight bytes than input bytes: ``conv2d.Conv2DNHWC`` runs it
    weights-stationary; one output pixel always is); None: left alone."""
    reason = not_dense_nhwc(call, weight)
    if reason is not None:
        return None, reason
    if weight.dtype != np.float32 or str(call.ty.dtype) != "float32":
        return None, f"dtype {weight.dtype}, not float32"
    data_shape, shape = call.args[0].ty.shape, call.ty.shape
    if any(not hasattr(dim, "value") for dim in [*data_shape, *shape]):
        return None, "the shapes are not static"
    if (weight.shape[:2] == (1, 1)) == spatial:
        return None, f"a {weight.shape[0]}x{weight.shape[1]} kernel: " + ("1x1, packed earlier" if spatial else "not 1x1")
    data_bytes = int(np.prod([int(dim) for dim in data_shape])) * 4
    if weight.nbytes <= data_bytes:
        return None, f"weights {weight.nbytes} bytes, input {data_bytes}: the weights are reused, not streamed"
    filters, channels = int(weight.shape[3]), int(weight.shape[2])
    _, _, _, (_, tile) = conv_tile(vector, [int(shape[1]), int(shape[2])], filters, channels, False)
    if tile >= filters or filters % tile:
        return None, f"a register tile of {tile} of the {filters} output channels: nothing to pack"
    return tile, f"packed by {tile} output channels"


def matvec_packed(data, packed):
    """``data[1, K] @ W`` on the weights ``packed`` holds (``pack_columns``)."""
    from tvm import te

    weight = columns_view(packed)
    depth, columns = (int(dim) for dim in weight.shape)
    k = te.reduce_axis((0, depth), name="k")
    return te.compute((int(data.shape[0]), columns), lambda m, n: te.sum(data[m, k] * weight[k, n], axis=k),
                      name="matmul")  # fmt: skip


def emit_matvec_packed(mutator, call, weight: np.ndarray, choice: tuple[int, int]):
    """``matmul(x, weight)`` as ``matvec_packed`` on the weights padded to ``choice``'s columns
    and packed by its tile, sliced back to the weights' columns, emitted by ``mutator``."""
    from tvm import relax

    padded, tile = choice
    columns = int(weight.shape[1])
    wider = np.zeros((weight.shape[0], padded), dtype=np.float32)
    wider[:, :columns] = weight
    packed = relax.const(pack_columns(wider, tile), "float32")
    kernel = mutator.builder_.call_te(matvec_packed, call.args[0], packed, primfunc_name_hint="matmul_packed")
    mutator.patterns.append((kernel.args[0], OUT_EWISE_FUSABLE))
    if padded == columns:
        return kernel
    return relax.op.strided_slice(mutator.builder_.emit(kernel), axes=[1], begin=[0], end=[columns])


def _packed_convs(vector: CpuVector, fallbacks: FallbackLog, spatial: bool):
    """The rewriter of the convolutions ``conv_matvec_tile(..., spatial)`` takes."""
    return conv2d_rewriter(explained(lambda call, weight: conv_matvec_tile(vector, call, weight, spatial), log),
                           emit_conv2d_packed, RULE, fallbacks, "kept as a conv2d on HWIO weights")  # fmt: skip


def packed_spatial_convolutions(vector: CpuVector, fallbacks: FallbackLog | None = None):
    """A module pass packing the weights of the convolutions larger than 1x1 that stream them
    (conv_matvec_tile with ``spatial``): after the Winograd rewrite, which takes its own."""
    import tvm

    convs = _packed_convs(vector, fallbacks if fallbacks is not None else FallbackLog(), spatial=True)

    @tvm.transform.module_pass(opt_level=0, name="EdgecPackedSpatialConvolutions")
    def _pass(mod, _ctx):
        return rewrite_module(mod, convs)[0]

    return _pass


def packed_matvec(vector: CpuVector, fallbacks: FallbackLog | None = None):
    """A module pass rewriting the matrix-vector products above (module docstring)."""
    import tvm

    fallbacks = fallbacks if fallbacks is not None else FallbackLog()
    convs = _packed_convs(vector, fallbacks, spatial=False)
    matmuls = call_rewriter("relax.matmul", explained(lambda call, weight: matvec_tile(vector, call.args[0].ty.shape, weight), log),
                            emit_matvec_packed, RULE, fallbacks, "kept as a matmul on [k, n] weights")  # fmt: skip

    @tvm.transform.module_pass(opt_level=0, name="EdgecPackedMatvec")
    def _pass(mod, _ctx):
        return rewrite_module(rewrite_module(mod, convs)[0], matmuls)[0]

    return _pass
