"""Tests of targets/schedules/qdq_integer.py: QDQ conv2d / depthwise / matmul lowered to integer
kernels (uint8 x int8 -> int32, requantization fused).

Structure: after the graph passes every quantized layer is a conv2d / matmul of uint8 (or int8)
activations and int8 constant weights with an int32 accumulator, and no weight is dequantized.
Numerics: against ONNX Runtime on the QDQ graph as written, exactly, on a layer whose scales put
half the accumulators on rounding ties (round half to even, zero-point padding, int32 bias, ReLU)
and on the tests' tiny MobileNetV2 (x86, and cortex-a7 on the emulated board); the int8
tolerance refuses a build whose one scale is 5 % off.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec
from backbone import SATURATION, assert_board_verified, require_host_features
from edgec.core.artifact import load_artifact
from edgec.core.numerics import compare, int8_tolerance
from edgec.passes import FoldBatchNormPass, QuantizeInt8Pass
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import qdq_references, run_onnxruntime
from edgec.verify import VerifyOptions


def tie_layer(zp_x: int = 3) -> ir.Model:
    """x -> Q(1, zp_x) -> DQ -> Conv 3x3 pad 1 (int8 weights, scales [1, 0.5], int32 bias) -> Relu
    -> Q(2, 128) -> DQ: the requantization multipliers are 0.5 and 0.25, so accumulators that are
    odd (channel 0) or 2 mod 4 (channel 1) land exactly on .5; the padding is zp_x, not 0."""
    rng = np.random.default_rng(3)
    weight = rng.integers(-5, 6, (2, 2, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xf"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wf"], axis=0),
        helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bf"], axis=0),
        helper.make_node("Conv", ["xf", "wf", "bf"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "sy", "zy"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array(1.0, np.float32), "sx"),
        numpy_helper.from_array(np.array(zp_x, np.uint8), "zx"),
        numpy_helper.from_array(weight, "wq"),
        numpy_helper.from_array(np.array([1.0, 0.5], np.float32), "sw"),
        numpy_helper.from_array(np.zeros(2, np.int8), "zw"),
        numpy_helper.from_array(np.array([5, -7], np.int32), "bq"),
        numpy_helper.from_array(np.array([1.0, 0.5], np.float32), "sb"),
        numpy_helper.from_array(np.zeros(2, np.int32), "zb"),
        numpy_helper.from_array(np.array(2.0, np.float32), "sy"),
        numpy_helper.from_array(np.array(128, np.uint8), "zy"),
    ]
    graph = helper.make_graph(nodes, "tie", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])], initializers)  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def tie_input(seed: int = 0) -> np.ndarray:
    """Integers, so that x_q = x + zp_x exactly and the accumulators are what the ties need."""
    return np.random.default_rng(seed).integers(-3, 40, (1, 2, 6, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_qdq(tmp_path_factory):
    """tests/models.py's tiny MobileNetV2 (conv, depthwise, residual adds, Linear) quantized by
    quantize-int8 with the first and last layers int8 too."""
    import warnings

    import torch

    from models import build, example_input

    path = tmp_path_factory.mktemp("qdq") / "mobilenet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(build("mobilenet"), (example_input("mobilenet"),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])  # fmt: skip
    model = edgec.load(path)
    calibration = np.random.default_rng(5).standard_normal((16, 3, 32, 32)).astype(np.float32)
    edgec.apply(model, [FoldBatchNormPass(), QuantizeInt8Pass(calibration=calibration, method="minmax", keep_first_last=False)])
    return model


def integer_module(graph: ir.Model):
    """The Relax module after import and graph:fold-constants, graph:clip, graph:qdq-integer."""
    from edgec.lower import to_relax
    from edgec.targets.schedules.graph import numpy_fold_constants, clip_as_relax_ops
    from edgec.targets.schedules.qdq_integer import qdq_integer

    mod = to_relax(graph)
    for inner in (numpy_fold_constants(), clip_as_relax_ops(), qdq_integer()):  # qdq-elementwise not: structure of the layers
        mod = inner(mod)
    return mod


def calls(mod, name: str) -> list:
    from tvm import relax

    found = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and getattr(value.op, "name", None) == name:
                found.append(value)
    return found


def test_every_quantized_layer_becomes_an_integer_kernel(tiny_qdq):
    import tvm

    layers = [node for node in tiny_qdq.graph.graph if node.op_type in ("Conv", "Gemm", "MatMul")]
    mod = integer_module(tiny_qdq.graph)
    convs, matmuls = calls(mod, "relax.nn.conv2d"), calls(mod, "relax.matmul")
    assert len(convs) + len(matmuls) == len(layers) and matmuls  # the classifier (Gemm) too
    assert any(int(conv.attrs.groups) > 1 for conv in convs)  # depthwise
    for call in convs + matmuls:
        assert str(call.attrs.out_dtype) == "int32"
        data, weight = call.args[0], call.args[1]
        assert data.ty.dtype in ("uint8", "int8")
        assert isinstance(weight, tvm.ir.expr.Constant) and weight.value.numpy().dtype == np.int8
    for dequantize in calls(mod, "relax.dequantize"):  # what stays dequantized: activations, biases of float outputs
        assert dequantize.args[0].ty.ndim != 4 or not isinstance(dequantize.args[0], tvm.ir.expr.Constant)
    assert len(calls(mod, "relax.quantize")) < sum(node.op_type == "QuantizeLinear" for node in tiny_qdq.graph.graph)


def test_ties_round_half_to_even_with_zero_point_padding(tmp_path):
    graph = tie_layer()
    mod = integer_module(graph)
    assert [str(conv.attrs.out_dtype) for conv in calls(mod, "relax.nn.conv2d")] == ["int32"]
    assert calls(mod, "relax.nn.pad")  # padding with zp_x = 3, explicitly
    result = edgec.compile(_model(graph), "x86", tmp_path / "tie")
    runner = LocalRunner(load_artifact(result.artifact.path))
    ties = 0
    for seed in range(3):
        x = tie_input(seed)
        want = run_onnxruntime(graph, [x], optimize=False)[0]
        got = runner.run([x])[0]
        np.testing.assert_array_equal(got, want)  # bit-exact
        # the test can fail: rounding half away from zero gives other codes on the ties
        ties += int(np.sum(np.abs(_half_away(x) - want) > 0))
    assert ties > 0


def _model(graph: ir.Model):
    from edgec.core.model import Model

    return Model(graph, None, "onnx", None)


def _half_away(x: np.ndarray) -> np.ndarray:
    """The tie layer in NumPy, rounding half away from zero (what a wrong kernel would do)."""
    import torch

    proto = ir.serde.serialize_model(tie_layer())
    init = {tensor.name: numpy_helper.to_array(tensor) for tensor in proto.graph.initializer}
    xq = np.clip(np.rint(x) + 3, 0, 255).astype(np.float64) - 3
    acc = torch.nn.functional.conv2d(torch.tensor(xq), torch.tensor(init["wq"].astype(np.float64)), padding=1).numpy()
    acc = acc + init["bq"].reshape(1, 2, 1, 1)
    f = np.maximum(acc * np.array([0.5, 0.25]).reshape(1, 2, 1, 1), 0.0)
    return (np.clip(np.sign(f) * np.floor(np.abs(f) + 0.5) + 128, 0, 255) - 128) * 2.0


def test_tiny_mobilenet_matches_onnxruntime_and_a_wrong_scale_fails(tiny_qdq, tmp_path):
    require_host_features("avx512vnni", why=SATURATION)
    result = edgec.compile(tiny_qdq, "x86", tmp_path / "int8")
    assert result.manifest["verification"]["status"] == "passed"
    kernels = [kernel["kernel"] for kernel in result.manifest["kernels"]]
    assert sum("conv2d" in name for name in kernels) >= 10 and any("matmul" in name for name in kernels)
    artifact = load_artifact(result.artifact.path)
    compiled = ir.load(str(artifact.onnx))
    steps = VerifyOptions().qdq_steps
    wrong = _scaled(compiled, 1.05)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)
        got = LocalRunner(artifact).run([x])
        want, fused = qdq_references(compiled, [x])
        allowed, step, _spread = int8_tolerance(want, fused, steps)  # compile's rule
        assert compare(got, want, rtol=0.0, atol=allowed).ok
        assert np.abs(got[0] - want[0]).max() <= step  # measured: bit-exact here (0 steps)
        off = run_onnxruntime(wrong, [x], optimize=False)  # a build with one weight scale 5 % off
        assert not compare(off, want, rtol=0.0, atol=allowed).ok


def _scaled(graph: ir.Model, factor: float) -> ir.Model:
    """A copy of ``graph`` whose first per-channel weight scale is multiplied by ``factor``."""
    proto = ir.serde.serialize_model(graph)
    scales = {node.input[1] for node in proto.graph.node if node.op_type == "DequantizeLinear"}
    for tensor in proto.graph.initializer:
        value = numpy_helper.to_array(tensor)
        if tensor.name in scales and value.ndim == 1 and value.size > 1 and value.dtype == np.float32:
            tensor.CopyFrom(numpy_helper.from_array(value * np.float32(factor), tensor.name))
            break
    return ir.serde.deserialize_model(proto)


def test_cortex_a7_int8_verified_on_the_emulated_board(tmp_path):
    result = edgec.compile(_model(tie_layer()), "cortex-a7", tmp_path / "a7")
    assert_board_verified(result.manifest, "cortex-a7")
    assert any("conv2d" in kernel["kernel"] for kernel in result.manifest["kernels"])


def test_aarch64_stores_the_int8_weights_as_int16_and_stays_bit_exact(tiny_qdq, tmp_path):
    """aarch64 (lane multiply-add) keeps the weights' values in int16 constants, what
    ``smlal v.4s, v.4h, v.h[i]`` reads; x86 keeps int8. The cortex-a53 build of the tie layer
    is bit-exact against ONNX Runtime on the emulated board (compile's verification) and
    here through the board's output."""
    from edgec.lower import to_relax
    from edgec.targets import resolve
    from edgec.targets.schedules.graph import clip_as_relax_ops, numpy_fold_constants
    from edgec.targets.schedules.qdq_integer import qdq_integer, weight_dtype
    from edgec.targets.vector import cpu_vector

    assert weight_dtype(cpu_vector(resolve("cortex-a53")).lane_fma) == "int16"
    assert weight_dtype(cpu_vector(resolve("x86")).lane_fma) == "int8"
    assert weight_dtype(cpu_vector(resolve("cortex-a7")).lane_fma) == "int8"
    narrow = integer_module(tiny_qdq.graph)
    wide = to_relax(tiny_qdq.graph)
    for inner in (numpy_fold_constants(), clip_as_relax_ops(), qdq_integer(weight_dtype=weight_dtype(True))):
        wide = inner(wide)
    pairs = list(zip(calls(narrow, "relax.nn.conv2d") + calls(narrow, "relax.matmul"),
                     calls(wide, "relax.nn.conv2d") + calls(wide, "relax.matmul"), strict=True))  # fmt: skip
    assert pairs
    for small, big in pairs:
        assert big.args[1].value.numpy().dtype == np.int16
        np.testing.assert_array_equal(big.args[1].value.numpy(), small.args[1].value.numpy().astype(np.int16))
    graph = tie_layer()
    result = edgec.compile(_model(graph), "cortex-a53", tmp_path / "a53")
    assert_board_verified(result.manifest, "cortex-a53")
    verification = result.manifest["verification"]
    if verification["status"] == "passed":
        assert verification["onnxruntime"]["max_abs"] == 0.0  # bit-exact
