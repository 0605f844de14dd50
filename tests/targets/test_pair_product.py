"""The pair-product int8 convolution on aarch64 without the dot product (cortex-a53;
targets/schedules/conv2d_pair.py, rewritten by dot_graph.py with ``pair``): weights packed
[kh, kw, ic/16, oc, 16], activations shifted to int8 as for ``sdot``, ``smull`` + ``smlal2`` into
int16 lanes, ``sadalp`` into int32, the 4 lanes of an accumulator summed by ``addp``.

Checked: which presets select it; the packing, the lane mapping and the shift's arithmetic (the
unscheduled kernel on this machine against a NumPy convolution in int64); the refusals (a weight
of -128, input channels not a multiple of 16); the rewrite of a convolution without an add after it;
the inner loop's assembly; and a two-layer int8 model on the emulated cortex-a53, bit-exact against
ONNX Runtime with pair-product kernels in lib.so.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgec.targets import resolve
from edgec.targets.schedules.conv2d_pair import BLOCK, Conv2DPair, conv2d_pair, pair_tile
from edgec.targets.schedules.dot_graph import ineligible, pack_weights, shift_correction
from edgec.targets.schedules.dot_kernels import Geometry
from edgec.targets.vector import cpu_vector
from test_dot_product import _dot_calls, _graph_after_passes, _int64_conv, compiled_kernels, two_layers
from test_lane_broadcast import inner_loop
from test_qdq_integer import calls


def test_only_aarch64_without_the_dot_product_has_pair_products():
    assert cpu_vector(resolve("cortex-a53")).pair_product
    for name in ("cortex-a55", "cortex-a7", "x86"):
        assert not cpu_vector(resolve(name)).pair_product


@pytest.mark.parametrize("kernel,stride,dtype", [(1, 1, "uint8"), (3, 2, "uint8"), (3, 1, "int8")])
def test_pair_products_equal_the_integer_convolution(kernel, stride, dtype):
    """The kernel's compute (unscheduled, built for this machine: the lane mapping and the lane
    sum) plus the folded shift equals the convolution of the unshifted codes, padding included."""
    import tvm
    from tvm import te

    rng = np.random.default_rng(2)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, (1, 9, 9, 32)).astype(dtype)
    weight = rng.integers(-127, 128, (kernel, kernel, 32, 12)).astype(np.int8)
    packed_weight = pack_weights(weight, BLOCK)
    assert packed_weight.shape == (kernel, kernel, 2, 12, 16)
    np.testing.assert_array_equal(packed_weight[:, :, 1, :, 3], weight[:, :, 16 + 3, :])
    pad = kernel // 2
    out_size = ((9 + 2 * pad - kernel) // stride + 1,) * 2
    geometry = Geometry((pad,) * 4, (stride, stride), (1, 1), out_size)
    data = te.placeholder(x.shape, dtype, name="x")
    packed = te.placeholder(packed_weight.shape, "int8", name="P")
    func = te.create_prim_func([data, packed, conv2d_pair(data, packed, geometry)])
    library = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=resolve("x86").tvm_target())
    out = tvm.runtime.tensor(np.zeros((1, *out_size, 12), np.int32))
    library["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(packed_weight), out)
    want = _int64_conv(x, weight, pad, stride, 0)
    np.testing.assert_array_equal(out.numpy().astype(np.int64) + shift_correction(weight, dtype), want)


def test_refusals_name_their_reason():
    conv = calls(_graph_after_passes(_no_bias_layer(), "cortex-a7"), "relax.nn.conv2d")[0]  # no rewrite there
    weight = conv.args[1].value.numpy()
    assert weight.shape == (1, 1, 32, 16) and ineligible(conv, weight, pair=True) is None
    extreme = weight.copy()
    extreme[0, 0, 5, 3] = -128
    assert "-128" in ineligible(conv, extreme, pair=True)
    assert ineligible(conv, extreme, pair=False) is None  # sdot takes -128: its lanes are int32
    assert "multiples of 16" in ineligible(conv, weight[:, :, :24], pair=True)


def test_pair_tile_fits_the_register_file():
    for rows, filters in [((14, 14), 576), ((7, 7), 960), ((112, 112), 96), ((28, 28), 192)]:
        (height, width), channels = pair_tile(list(rows), filters)
        points = height * width
        assert channels % 4 == 0 and filters % channels == 0 and rows[0] % height == 0 and rows[1] % width == 0
        assert points * channels <= 16 and points * channels + points + channels + 2 <= 32


def pair_kernel(kernel=1, channels=96, filters=576, size=14):
    from tvm import te

    pad = kernel // 2
    data = te.placeholder((1, size, size, channels), "uint8", name="x")
    packed = te.placeholder((kernel, kernel, channels // BLOCK, filters, BLOCK), "int8", name="P")
    out = conv2d_pair(data, packed, Geometry((pad,) * 4, (1, 1), (1, 1), (size, size)))
    return te.create_prim_func([data, packed, out])


def test_inner_loop_is_smull_smlal2_sadalp():
    sch = Conv2DPair(cpu_vector(resolve("cortex-a53"))).apply(pair_kernel())
    loop = inner_loop(sch.mod["main"], resolve("cortex-a53").tvm_target(), "smull")
    smull = [op for op in loop if op.startswith("smull")]
    assert len(smull) == sum(op.startswith("smlal2") for op in loop) == sum(op.startswith("sadalp") for op in loop)
    assert all(re.search(r"\.8h, v\d+\.8b, v\d+\.8b$", op) for op in smull)
    assert not any(op.startswith(("dup", "ext", "uzp", "zip", "mov ")) for op in loop)  # whole 16-byte operands
    # measured: 3.75 instructions per smull (16 MACs) in this 14x14 96 -> 576 kernel's loop
    assert len(loop) / len(smull) < 4.5


def _no_bias_layer():
    """One 1x1 conv, input zero point 0 and no bias: qdq_integer writes no add after the conv2d."""
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    initializers = [
        numpy_helper.from_array(np.array(0.05, np.float32), "sx"), numpy_helper.from_array(np.array(0, np.uint8), "zx"),
        numpy_helper.from_array(rng.integers(-127, 128, (16, 32, 1, 1)).astype(np.int8), "w"),
        numpy_helper.from_array(rng.uniform(0.002, 0.004, 16).astype(np.float32), "sw"),
        numpy_helper.from_array(np.zeros(16, np.int8), "zw"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "sx", "zx"], ["xf"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=0),
        helper.make_node("Conv", ["xf", "wf"], ["y"], kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(nodes, "nobias", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 6])], initializers)  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def test_a_convolution_without_an_add_is_rewritten_with_its_correction():
    mod = _graph_after_passes(_no_bias_layer(), "cortex-a53")
    assert len(_dot_calls(mod, "conv2d_pair")) == 1
    assert not calls(mod, "relax.nn.conv2d")


def test_cortex_a53_int8_is_bit_exact_on_the_emulated_board_with_pair_products_in_lib_so(tmp_path):
    graph = two_layers()
    assert len(_dot_calls(_graph_after_passes(graph, "cortex-a53"), "conv2d_pair")) == 2
    for body in compiled_kernels(graph, "cortex-a53", tmp_path / "a53", "fused_conv2d_pair", "conv2d-pair"):
        assert re.search(r"\bsmlal2\s+v\d+\.8h, v\d+\.16b, v\d+\.16b", body)
        assert re.search(r"\bsadalp\s+v\d+\.4s, v\d+\.8h", body) and re.search(r"\baddp\s+v\d+\.4s", body)
        assert not re.search(r"\bsmlal\s+v\d+\.4s, v\d+\.4h, v\d+\.h\[", body)  # not the int16 lane kernel
