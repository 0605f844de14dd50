"""conv2d_int8.py: on a VNNI CPU the uint8 x int8 convolutions take a kernel on packed weights
whose inner loop is ``vpdpbusd`` (objdump of lib.so), bit-exact against ONNX Runtime on the QDQ
graph; on an AVX2 CPU (haswell) they keep the int32-lane path, also bit-exact."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec
from backbone import disassembly, needs_objdump
from edgec.core.artifact import load_artifact
from edgec.core.model import Model
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import run_onnxruntime
from edgec.targets import resolve
from edgec.targets.schedules.conv2d_int8 import ineligible, pack_weights
from edgec.targets.vector import cpu_vector

HOST_VNNI = cpu_vector(resolve("x86")).int8_dot

# (input channels, filters, kernel, size, stride, input zero point, padding)
LAYERS = {
    "3x3 zero-point padding": (32, 64, 3, 10, 1, 3, 1),
    "1x1 stride 2": (48, 32, 1, 9, 2, 0, 0),
    "3x3 zero padding": (16, 16, 3, 7, 1, 0, 1),
    "1x1 24 filters (ymm)": (96, 24, 1, 8, 1, 5, 0),
}


def qdq_conv(channels, filters, kernel, size, stride, zp_x, pad) -> ir.Model:
    """x -> Q/DQ (s 0.05, zp_x) -> Conv (int8 weights per channel, int32 bias) -> Relu -> Q/DQ."""
    rng = np.random.default_rng(channels + filters + kernel)
    weight = rng.integers(-127, 128, (filters, channels, kernel, kernel)).astype(np.int8)
    scales = rng.uniform(0.001, 0.003, filters).astype(np.float32)
    qdq = [("QuantizeLinear", "x", "xq", "x"), ("DequantizeLinear", "xq", "xf", "x"), ("DequantizeLinear", "wq", "wf", "w"),
           ("DequantizeLinear", "bq", "bf", "b"), ("QuantizeLinear", "r", "yq", "y"), ("DequantizeLinear", "yq", "y", "y")]
    nodes = [helper.make_node(op, [source, f"s{tensor}", f"z{tensor}"], [result], **({"axis": 0} if tensor in "wb" else {}))
             for op, source, result, tensor in qdq]  # fmt: skip
    conv = {"pads": [pad] * 4, "kernel_shape": [kernel] * 2, "strides": [stride] * 2}
    nodes[4:4] = [helper.make_node("Conv", ["xf", "wf", "bf"], ["c"], **conv), helper.make_node("Relu", ["c"], ["r"])]
    initializers = [
        numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
        numpy_helper.from_array(np.array(zp_x, np.uint8), "zx"),
        numpy_helper.from_array(weight, "wq"),
        numpy_helper.from_array(scales, "sw"),
        numpy_helper.from_array(np.zeros(filters, np.int8), "zw"),
        numpy_helper.from_array(rng.integers(-2000, 2000, filters).astype(np.int32), "bq"),
        numpy_helper.from_array((np.float32(0.05) * scales).astype(np.float32), "sb"),
        numpy_helper.from_array(np.zeros(filters, np.int32), "zb"),
        numpy_helper.from_array(np.array(0.25, np.float32), "sy"),
        numpy_helper.from_array(np.array(0, np.uint8), "zy"),
    ]
    out = (size + 2 * pad - kernel) // stride + 1
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, filters, out, out])], initializers)  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def assert_bit_exact(graph: ir.Model, artifact, channels: int, size: int) -> None:
    runner = LocalRunner(load_artifact(artifact))
    for seed in range(2):
        x = np.random.default_rng(seed).uniform(-1.0, 12.0, (1, channels, size, size)).astype(np.float32)
        want = run_onnxruntime(graph, [x], optimize=False)[0]
        assert np.count_nonzero(want) > want.size // 4  # the ReLU leaves enough to compare
        np.testing.assert_array_equal(runner.run([x])[0], want)


def x86_loops(lib) -> list[list[str]]:
    """The instruction mnemonics of every loop (a backward jump within its function and what it
    jumps over) in ``lib``'s objdump, innermost first. A jump out of its function (a tail call
    to a PLT entry lower in the file) is no loop."""
    listing = disassembly(lib)
    rows = []  # (address, mnemonic, operands, start of the function)
    function = 0
    for line in listing.splitlines():
        if header := re.match(r"^([0-9a-f]+) <.*>:$", line):
            function = int(header.group(1), 16)
        elif match := re.match(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$", line):
            rows.append((int(match.group(1), 16), match.group(2), match.group(3), function))
    loops = []
    for index, (address, mnemonic, operands, function) in enumerate(rows):
        jump = re.match(r"^([0-9a-f]+)\s", operands)
        if mnemonic.startswith("j") and jump and function <= int(jump.group(1), 16) <= address:
            start = int(jump.group(1), 16)
            loops.append([m for a, m, _, _ in rows[: index + 1] if a >= start])
    return sorted(loops, key=len)


def test_vnni_is_target_data():
    """The capability comes from the CPU's features (a CpuVector field), not a CPU name in the rule."""
    x86 = resolve("x86")
    haswell = dataclasses.replace(x86, tvm_json={**x86.tvm_json, "mcpu": "haswell"})
    icelake = dataclasses.replace(x86, tvm_json={**x86.tvm_json, "mcpu": "icelake-server"})
    assert not cpu_vector(haswell).int8_dot and cpu_vector(icelake).int8_dot
    assert not any(cpu_vector(resolve(name)).int8_dot for name in ("cortex-a7", "cortex-a53", "cortex-a72"))


def test_packed_weights_put_four_input_channels_of_one_filter_in_a_lane():
    weight = np.random.default_rng(0).integers(-128, 128, (3, 3, 8, 32)).astype(np.int8)  # HWIO
    packed = pack_weights(weight)
    assert packed.shape == (2, 3, 3, 2, 16, 4) and packed.dtype == np.int8
    f, ry, rx, c = np.meshgrid(np.arange(32), np.arange(3), np.arange(3), np.arange(8), indexing="ij")
    np.testing.assert_array_equal(packed[f // 16, ry, rx, c // 4, f % 16, c % 4], weight[ry, rx, c, f])
    narrow = pack_weights(weight[..., :24])  # 24 filters: 8 int32 lanes (ymm)
    assert narrow.shape == (3, 3, 3, 2, 8, 4)
    f = f[:24]
    np.testing.assert_array_equal(narrow[f // 8, ry[:24], rx[:24], c[:24] // 4, f % 8, c[:24] % 4], weight[ry[:24], rx[:24], c[:24], f])


@needs_objdump
@pytest.mark.skipif(not HOST_VNNI, reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("name", list(LAYERS))
def test_vnni_inner_loop_is_vpdpbusd_and_bit_exact(name, tmp_path):
    channels, _, _, size, *_ = LAYERS[name]
    graph = qdq_conv(*LAYERS[name])
    result = edgec.compile(Model(graph, None, "onnx", None), "x86", tmp_path / "vnni")
    assert result.manifest["schedules"]["by_rule"].get("conv2d-int8-dot") == 1
    loops = [loop for loop in x86_loops(result.artifact.path / "lib.so") if "vpdpbusd" in loop]
    assert loops
    inner = loops[0]
    assert inner.count("vpdpbusd") >= 4  # a register tile of 64-MAC products
    assert not any(m.startswith(("vpmovzx", "vpmovsx", "vpdpwssd")) for m in inner)  # no widening to int32 lanes
    # no call in any loop around the products: the intrinsic's 4-byte "local" operand on the
    # stack, not one workspace-pool allocation per tile (edgec/stack_buffers.py)
    assert not [m for loop in loops for m in loop if m.startswith("call")]
    assert_bit_exact(graph, result.artifact.path, channels, size)


@needs_objdump
def test_avx2_keeps_the_int32_lane_kernel_and_is_bit_exact(tmp_path):
    """haswell (AVX2, no VNNI) code runs on any later x86: built and verified here."""
    x86 = resolve("x86")
    haswell = dataclasses.replace(x86, tvm_json={**x86.tvm_json, "mcpu": "haswell"})
    channels, _, _, size, *_ = LAYERS["3x3 zero-point padding"]
    graph = qdq_conv(*LAYERS["3x3 zero-point padding"])
    result = edgec.compile(Model(graph, None, "onnx", None), haswell, tmp_path / "avx2")
    by_rule = result.manifest["schedules"]["by_rule"]
    assert "conv2d-int8-dot" not in by_rule and by_rule.get("conv2d-nhwc") == 1
    listing = disassembly(result.artifact.path / "lib.so")
    assert "vpdpbusd" not in listing and "zmm" not in listing
    assert_bit_exact(graph, result.artifact.path, channels, size)


def test_ineligible_convolutions_say_why():
    from tvm import relax

    x = relax.Var("x", relax.TensorType([1, 8, 8, 3], "uint8"))
    stem = relax.op.nn.conv2d(x, relax.const(np.zeros((3, 3, 3, 16), np.int8)), data_layout="NHWC", kernel_layout="HWIO",
                              out_dtype="int32")  # fmt: skip
    stem = relax.BlockBuilder().normalize(stem)
    assert "not multiples of 4" in ineligible(stem, np.zeros((3, 3, 3, 16), np.int8))
    assert "not a constant" in ineligible(stem, None)
