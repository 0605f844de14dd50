"""Weights packed by the register tile's output channels on aarch64 (targets/schedules/packed_weights.py):
``P[f / T, ry, rx, rc, f % T] = W[ry, rx, rc, f]`` for the convolutions read by lane, so that the
tile's weight vectors for consecutive reduction steps are adjacent and ``ldp`` pairs them.

Checked: the packing, the kernel on packed weights against TOPI's on HWIO ones (built for this
machine: TIR means the same on any CPU), that the schedule library tiles it as the HWIO one, which
convolutions the graph rewrite takes (aarch64 only; not a tile as wide as the convolution, not a
depthwise one), and the aarch64 inner loops: more ``ldp`` and fewer instructions per ``fmla``.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgec.targets import resolve
from edgec.targets.schedules import default_rules, schedule_func
from edgec.targets.schedules.packed_weights import conv2d_packed, pack_weights, packed_tile
from edgec.targets.vector import cpu_vector
from test_lane_broadcast import inner_loop  # tests/targets is on the path (pytest prepends it)
from test_schedules import conv_kernel

A53 = cpu_vector(resolve("cortex-a53"))


def packed_kernel(kernel=3, stride=2, channels=16, filters=24, size=15, tile=8):
    from tvm import te, topi

    data = te.placeholder((1, size, size, channels), name="x")
    packed = te.placeholder((filters // tile, kernel, kernel, channels, tile), name="P")
    bias = te.placeholder((1, 1, 1, filters), name="b")
    out = conv2d_packed(data, packed, stride, kernel // 2, 1, filters)
    return te.create_prim_func([data, packed, bias, topi.nn.relu(topi.add(out, bias))])


def test_pack_weights_puts_a_tiles_channels_of_each_reduction_step_together():
    weight = np.arange(3 * 3 * 5 * 16, dtype=np.float32).reshape(3, 3, 5, 16)
    packed = pack_weights(weight, 8)
    assert packed.shape == (2, 3, 3, 5, 8) and packed.flags.c_contiguous
    for f in range(16):
        np.testing.assert_array_equal(packed[f // 8, :, :, :, f % 8], weight[..., f])
    with pytest.raises(ValueError):
        pack_weights(weight, 6)  # the tile divides the output channels


@pytest.mark.parametrize("kernel, stride, channels, size", [(3, 2, 16, 15), (1, 1, 32, 14), (7, 2, 3, 32)])
def test_packed_kernel_computes_what_the_hwio_one_does(kernel, stride, channels, size):
    import tvm

    filters, tile = 24, 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, size, size, channels)).astype("float32")
    weight = rng.standard_normal((kernel, kernel, channels, filters)).astype("float32")
    bias = rng.standard_normal((1, 1, 1, filters)).astype("float32")
    target = resolve("x86").tvm_target()
    outputs = []
    for func, w in [(conv_kernel(kernel, stride, channels, filters, size), weight),
                    (packed_kernel(kernel, stride, channels, filters, size, tile), pack_weights(weight, tile))]:
        scheduled, rule = schedule_func(func, default_rules(A53))
        assert rule == "conv2d-nhwc"  # the packed weights do not push it to a generic schedule
        library = tvm.tirx.build(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target)
        out_shape = [int(d) for d in func.params[-1].ty.shape]
        out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
        library["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(bias), out)
        outputs.append(out.numpy())
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


class _Call:
    """What ``packed_tile`` reads of a Relax conv2d call: attrs, the input's and output's types."""

    def __init__(self, data_shape, out_shape, groups=1, layouts=("NHWC", "HWIO", "NHWC")):
        from types import SimpleNamespace

        from tvm import tirx

        def typed(shape):
            return SimpleNamespace(shape=[tirx.IntImm("int64", d) for d in shape], dtype="float32")

        self.attrs = SimpleNamespace(data_layout=layouts[0], kernel_layout=layouts[1], out_layout=layouts[2], groups=groups)
        self.args = [SimpleNamespace(ty=typed(data_shape))]
        self.ty = typed(out_shape)


def test_packed_tile_takes_convolutions_read_by_lane_on_aarch64_only():
    def weight(kh, channels, filters):
        return np.zeros((kh, kh, channels, filters), np.float32)

    stride2 = _Call((1, 56, 56, 64), (1, 28, 28, 128))
    tile, _ = packed_tile(stride2, weight(3, 64, 128), A53)
    assert tile == 8  # ResNet-18's first stride-2 3x3: a 2 x 4 pixel x 8 channel tile
    stem = _Call((1, 224, 224, 3), (1, 112, 112, 64))
    assert packed_tile(stem, weight(7, 3, 64), A53)[0] == 8  # staged RGB stem
    # without a lane multiply-add nothing is read by lane
    assert packed_tile(stride2, weight(3, 64, 128), cpu_vector(resolve("cortex-a7")))[0] is None
    # a tile as wide as the convolution: nothing to pack
    assert packed_tile(_Call((1, 7, 7, 64), (1, 7, 7, 8)), weight(1, 64, 8), A53)[0] is None
    # 4 input channels, one vector: not read by lane
    assert packed_tile(_Call((1, 28, 28, 4), (1, 28, 28, 64)), weight(3, 4, 64), A53)[0] is None
    assert packed_tile(_Call((1, 28, 28, 64), (1, 28, 28, 64), groups=64), weight(3, 1, 64), A53)[0] is None
    assert packed_tile(stride2, None, A53)[0] is None  # weights not a constant
    # HWIO weights of a loop body within ldp's reach (4 steps x 24 channels; a 3x3 row of 3 x 24):
    # left alone (MobileNetV2's 96 -> 24 1x1 ran 1.10x the instructions packed)
    tile, why = packed_tile(_Call((1, 56, 56, 96), (1, 56, 56, 24)), weight(1, 96, 24), A53)
    assert tile is None and "ldp" in why
    assert packed_tile(_Call((1, 224, 224, 3), (1, 112, 112, 24)), weight(3, 3, 24), A53)[0] is None
    assert packed_tile(_Call((1, 224, 224, 3), (1, 112, 112, 32)), weight(3, 3, 32), A53)[0] == 8  # 1152 bytes


@pytest.mark.parametrize("kernel, stride, channels, size", [(3, 2, 64, 56), (7, 2, 3, 32)])
def test_aarch64_inner_loop_pairs_the_weight_loads(kernel, stride, channels, size):
    target = resolve("cortex-a53").tvm_target()
    loops = []
    for func in (conv_kernel(kernel, stride, channels, 128, size), packed_kernel(kernel, stride, channels, 128, size, 8)):
        scheduled, _ = schedule_func(func, default_rules(A53))
        loops.append(inner_loop(scheduled, target))
    (hwio, packed) = loops
    fmla = [sum(op.startswith("fmla") for op in loop) for loop in loops]
    assert fmla[0] == fmla[1]  # the same tile
    assert sum(op.startswith("ldp") for op in packed) > 2 * sum(op.startswith("ldp") for op in hwio)
    assert not any(op.startswith(("str", "stp")) for op in packed)  # nothing spilled
    assert len(packed) / fmla[1] < len(hwio) / fmla[0]


def test_winograd_gemm_on_packed_weights_computes_the_same_and_pairs_its_loads():
    """The Winograd GEMM's transformed weights ``U[e, c, f]`` packed ``[e, f / T, c, T]``
    (winograd_graph.py with ``packing``): the same products, the same tile, more ``ldp``."""
    import tvm
    from tvm import te

    from edgec.targets.schedules.packed_weights import columns_view, gemm_tile, pack_columns
    from edgec.targets.schedules.winograd_kernels import gemm

    elements, rows, depth, columns = 36, 4, 64, 128
    tile = gemm_tile(A53, rows, columns, depth)
    assert tile == 16  # ResNet-18's 7x7 GEMM tile: 4 rows x 4 vectors
    assert gemm_tile(A53, 196, 64, 64) == 8 and gemm_tile(A53, 196, 32, 64) is None  # 512 bytes: within reach
    assert gemm_tile(cpu_vector(resolve("cortex-a7")), rows, columns, depth) is None
    data = te.placeholder((elements, rows, depth), name="V")
    plain = te.placeholder((elements, depth, columns), name="U")
    packed = te.placeholder((elements, columns // tile, depth, tile), name="P")
    funcs = [te.create_prim_func([data, plain, gemm(data, plain)]), te.create_prim_func([data, packed, gemm(data, columns_view(packed))])]
    rng = np.random.default_rng(0)
    v = rng.standard_normal((elements, rows, depth)).astype("float32")
    u = rng.standard_normal((elements, depth, columns)).astype("float32")
    np.testing.assert_array_equal(pack_columns(u, tile)[:, 1, :, 3], u[:, :, tile + 3])
    outputs, loops = [], []
    for func, weights in zip(funcs, (u, pack_columns(u, tile)), strict=True):
        scheduled, rule = schedule_func(func, default_rules(A53))
        assert rule == "dense"
        library = tvm.tirx.build(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=resolve("x86").tvm_target())
        out = tvm.runtime.tensor(np.zeros((elements, rows, columns), "float32"))
        library["main"](tvm.runtime.tensor(v), tvm.runtime.tensor(weights), out)
        outputs.append(out.numpy())
        loops.append(inner_loop(scheduled, resolve("cortex-a53").tvm_target()))
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs[0], np.einsum("epc,ecf->epf", v, u), rtol=1e-4, atol=1e-4)
    hwio, paired = loops
    fmla = [sum(op.startswith("fmla") for op in loop) for loop in loops]
    assert fmla[0] == fmla[1]
    assert sum(op.startswith("ldp") for op in paired) > 2 * sum(op.startswith("ldp") for op in hwio)
    assert len(paired) / fmla[1] < len(hwio) / fmla[0]
