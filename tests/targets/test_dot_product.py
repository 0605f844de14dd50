"""The dot-product int8 convolution on cortex-a55 (targets/schedules/dot_graph.py, dot_kernels.py,
conv2d_dot.py): weights repacked [kh, kw, ic/4, oc, 4], uint8 activations shifted to int8 with
128 * sum(w) folded into the int32 constant, ``sdot`` on 4 input channels per lane.

Checked: the packing and the shift's arithmetic (the unscheduled kernel on this machine against
a NumPy convolution in int64, padded with the zero point), which layers the rewrite takes on the
tests' tiny MobileNetV2 (cortex-a55 only; not on cortex-a53), the inner loop's assembly (indexed
``sdot`` only, no per-group broadcast), and a two-layer int8 model on the emulated board,
bit-exact against ONNX Runtime (compile's verification) with ``sdot`` in lib.so.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec
from backbone import assert_board_verified
from edgec.targets import resolve
from edgec.targets.schedules.conv2d_dot import Conv2DDot
from edgec.targets.schedules.dot_graph import ineligible, pack_weights, shift_correction
from edgec.targets.schedules.dot_kernels import Geometry, conv2d_dot
from edgec.targets.vector import cpu_vector
from test_lane_broadcast import inner_loop  # tests/targets is on the path (pytest prepends it)
from test_qdq_integer import _model, calls, tiny_qdq  # noqa: F401 - tiny_qdq is a fixture


def test_only_the_dot_product_preset_has_sdot():
    assert cpu_vector(resolve("cortex-a55")).dot_product
    assert cpu_vector(resolve("cortex-a55")).lane_fma
    for name in ("cortex-a53", "cortex-a72", "cortex-a7", "x86"):
        assert not cpu_vector(resolve(name)).dot_product


def test_packing_puts_the_sixteen_bytes_of_one_sdot_together():
    weight = np.random.default_rng(0).integers(-127, 128, (3, 3, 8, 12)).astype(np.int16)
    packed = pack_weights(weight)
    assert packed.shape == (3, 3, 2, 12, 4) and packed.dtype == np.int8
    for group in range(2):
        for lane in range(4):
            np.testing.assert_array_equal(packed[:, :, group, :, lane], weight[:, :, 4 * group + lane, :])
    np.testing.assert_array_equal(shift_correction(weight, "uint8"), 128 * weight.astype(np.int64).sum(axis=(0, 1, 2)))
    assert not shift_correction(weight, "int8").any()


def _int64_conv(x: np.ndarray, weight: np.ndarray, pad: int, stride: int, pad_value: int) -> np.ndarray:
    """NHWC x HWIO in int64, the input padded with ``pad_value``."""
    x = np.pad(x.astype(np.int64), [(0, 0), (pad, pad), (pad, pad), (0, 0)], constant_values=pad_value)
    kh, kw, _, filters = weight.shape
    out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, filters), np.int64)
    for ry in range(kh):
        for rx in range(kw):
            window = x[:, ry : ry + stride * out_h : stride, rx : rx + stride * out_w : stride, :]
            out += window @ weight[ry, rx].astype(np.int64)
    return out


@pytest.mark.parametrize("kernel,stride,dtype", [(1, 1, "uint8"), (3, 2, "uint8"), (3, 1, "int8")])
def test_shifted_dot_product_equals_the_integer_convolution(kernel, stride, dtype):
    """The kernel's compute (unscheduled, built for this machine) plus the folded shift equals the
    convolution of the unshifted codes, the padding included (zero before the shift)."""
    import tvm
    from tvm import te

    rng = np.random.default_rng(1)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, (1, 9, 9, 8)).astype(dtype)
    weight = rng.integers(-127, 128, (kernel, kernel, 8, 12)).astype(np.int8)
    pad = kernel // 2
    out_size = ((9 + 2 * pad - kernel) // stride + 1,) * 2
    geometry = Geometry((pad,) * 4, (stride, stride), (1, 1), out_size)
    data = te.placeholder(x.shape, dtype, name="x")
    packed = te.placeholder((kernel, kernel, 2, 12, 4), "int8", name="P")
    func = te.create_prim_func([data, packed, conv2d_dot(data, packed, geometry)])
    library = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=resolve("x86").tvm_target())
    out = tvm.runtime.tensor(np.zeros((1, *out_size, 12), np.int32))
    library["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(pack_weights(weight)), out)
    want = _int64_conv(x, weight, pad, stride, 0)
    np.testing.assert_array_equal(out.numpy().astype(np.int64) + shift_correction(weight, dtype), want)


def _graph_after_passes(graph, preset: str):
    from edgec.lower import to_relax
    from edgec.targets.schedules import graph_passes

    mod = to_relax(graph)
    with resolve(preset).tvm_target():
        for graph_pass in graph_passes(cpu_vector(resolve(preset))):
            mod = graph_pass(mod)
    return mod


def _dot_calls(mod, kernel: str = "conv2d_dot") -> list:
    return [call for call in calls(mod, "relax.call_tir") if call.args[0].name_hint.startswith(kernel)]


def test_rewrite_takes_the_pointwise_layers_on_the_dot_product_preset_only(tiny_qdq):  # noqa: F811
    a55, a53 = _graph_after_passes(tiny_qdq.graph, "cortex-a55"), _graph_after_passes(tiny_qdq.graph, "cortex-a53")
    dots = _dot_calls(a55)
    assert dots and not _dot_calls(a53)
    left = [conv for conv in calls(a55, "relax.nn.conv2d") if ineligible(conv, conv.args[1].value.numpy()) is None]
    assert not left  # every eligible convolution was rewritten
    for call in dots:
        packed = call.args[1].fields[1]
        assert packed.value.numpy().dtype == np.int8 and packed.value.numpy().ndim == 5
    # the depthwise and the 3-channel stem stay convolutions, each for its reason
    reasons = {ineligible(conv, conv.args[1].value.numpy()) for conv in calls(a55, "relax.nn.conv2d")}
    assert any(reason and reason.startswith("groups=") for reason in reasons)
    # cortex-a53 (no sdot): the layers whose input channels are multiples of 16 are pair-product kernels
    pairs = _dot_calls(a53, "conv2d_pair")
    assert pairs and len(calls(a53, "relax.nn.conv2d")) + len(pairs) == len(calls(a55, "relax.nn.conv2d")) + len(dots)


def dot_kernel(kernel=1, channels=64, filters=32, size=14):
    from tvm import te

    pad = kernel // 2
    data = te.placeholder((1, size, size, channels), "uint8", name="x")
    packed = te.placeholder((kernel, kernel, channels // 4, filters, 4), "int8", name="P")
    out = conv2d_dot(data, packed, Geometry((pad,) * 4, (1, 1), (1, 1), (size, size)))
    return te.create_prim_func([data, packed, out])


@pytest.mark.parametrize("kernel", [1, 3])
def test_inner_loop_is_indexed_sdot(kernel):
    func = dot_kernel(kernel)
    sch = Conv2DDot(cpu_vector(resolve("cortex-a55"))).apply(func)
    loop = inner_loop(sch.mod["main"], resolve("cortex-a55").tvm_target(), "sdot")
    sdot = [op for op in loop if op.startswith("sdot")]
    assert not any(op.startswith("dup") for op in loop)
    assert not any(op.startswith(("smlal", "mla", "mul")) for op in loop)
    assert all(re.search(r"\.4b\[[0-3]\]$", op) for op in sdot)  # every sdot reads a lane of a 16-byte copy
    if kernel == 1:  # the activations shifted in the loop (3x3: once, in the padded copy)
        assert any(op.startswith("eor") for op in loop)
    # measured: 1x1 1.29 instructions per sdot (16 MACs), 3x3 (a lane copy of the shifted, padded input) 1.20
    assert len(loop) / len(sdot) < 1.6


def two_layers() -> ir.Model:
    """x -> Q(zp 3) -> Conv 3x3 pad 1, 16 -> 32 -> Relu -> Q -> Conv 1x1 32 -> 32 -> Q(zp 120) -> DQ, int32 biases:
    the padded path (the shift written once) and the lane path, both rewritten on cortex-a55."""
    rng = np.random.default_rng(7)
    nodes, initializers = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["q0"])], []
    initializers += [numpy_helper.from_array(np.array(0.05, np.float32), "sx"), numpy_helper.from_array(np.array(3, np.uint8), "zx")]
    scales = {"q0": ("sx", "zx")}
    source = "q0"
    for index, (kernel, channels, filters) in enumerate([(3, 16, 32), (1, 32, 32)]):
        weight = rng.integers(-127, 128, (filters, channels, kernel, kernel)).astype(np.int8)
        w_scale = rng.uniform(0.002, 0.004, filters).astype(np.float32)
        x_scale = numpy_helper.to_array(next(t for t in initializers if t.name == scales[source][0]))
        initializers += [
            numpy_helper.from_array(weight, f"w{index}"), numpy_helper.from_array(w_scale, f"sw{index}"),
            numpy_helper.from_array(np.zeros(filters, np.int8), f"zw{index}"),
            numpy_helper.from_array(rng.integers(-2000, 2000, filters).astype(np.int32), f"b{index}"),
            numpy_helper.from_array((np.float32(x_scale) * w_scale).astype(np.float32), f"sb{index}"),
            numpy_helper.from_array(np.zeros(filters, np.int32), f"zb{index}"),
            numpy_helper.from_array(np.array(0.1, np.float32), f"sy{index}"),
            numpy_helper.from_array(np.array(0 if index == 0 else 120, np.uint8), f"zy{index}"),
        ]  # fmt: skip
        nodes += [
            helper.make_node("DequantizeLinear", [source, *scales[source]], [f"xf{index}"]),
            helper.make_node("DequantizeLinear", [f"w{index}", f"sw{index}", f"zw{index}"], [f"wf{index}"], axis=0),
            helper.make_node("DequantizeLinear", [f"b{index}", f"sb{index}", f"zb{index}"], [f"bf{index}"], axis=0),
            helper.make_node("Conv", [f"xf{index}", f"wf{index}", f"bf{index}"], [f"c{index}"], pads=[kernel // 2] * 4,
                             kernel_shape=[kernel, kernel]),
        ]  # fmt: skip
        activation = f"c{index}"
        if index == 0:
            nodes.append(helper.make_node("Relu", [activation], ["r0"]))
            activation = "r0"
        nodes.append(helper.make_node("QuantizeLinear", [activation, f"sy{index}", f"zy{index}"], [f"q{index + 1}"]))
        scales[f"q{index + 1}"] = (f"sy{index}", f"zy{index}")
        source = f"q{index + 1}"
    nodes.append(helper.make_node("DequantizeLinear", [source, *scales[source]], ["y"]))
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 10, 10])], initializers)  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def compiled_kernels(graph, preset: str, out, prefix: str, rule: str) -> list[str]:
    """Compile ``graph`` for ``preset``: verified on its emulated board, bit-exact against ORT,
    its two ``prefix`` kernels scheduled by ``rule``; returns their disassembly (objdump of lib.so)."""
    result = edgec.compile(_model(graph), preset, out)
    assert_board_verified(result.manifest, preset)
    verification = result.manifest["verification"]
    if verification["status"] == "passed":
        assert verification["onnxruntime"]["max_abs"] == 0.0  # bit-exact
    schedules = {kernel["kernel"]: kernel["schedule"] for kernel in result.manifest["kernels"]}
    names = [name for name in schedules if name.startswith(prefix)]
    assert len(names) == 2 and all(schedules[name] == rule for name in names)
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        pytest.skip("aarch64-linux-gnu-objdump is not installed (binutils-aarch64-linux-gnu)")
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(result.artifact.path / "lib.so")],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    return [text.split(f"<{name}_compute_>:", 1)[1].split("\n\n", 1)[0] for name in names]


def test_cortex_a55_int8_is_bit_exact_on_the_emulated_board_with_sdot_in_lib_so(tmp_path):
    graph = two_layers()
    assert len(_dot_calls(_graph_after_passes(graph, "cortex-a55"))) == 2
    for body in compiled_kernels(graph, "cortex-a55", tmp_path / "a55", "fused_conv2d_dot", "conv2d-dot"):
        assert re.search(r"\bsdot\s+v\d+\.4s, v\d+\.16b, v\d+\.4b\[[0-3]\]", body)  # indexed: a lane of the activations
        assert "smlal" not in body
