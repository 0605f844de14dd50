"""edgec compile of int8 QDQ graphs (issue 17, part 2): made by ``-p quantize-int8`` and by ONNX
Runtime's ``quantize_static``; built and verified against ONNX Runtime on the QDQ graph (as
written) on x86 and on the emulated cortex-a53; the int8 tolerance in output quantization steps
(edgec/core/numerics.py) applies to QDQ graphs only."""

from __future__ import annotations

import dataclasses

import warnings

import numpy as np
import onnx_ir as ir
import pytest

import edgec
from backbone import SATURATION, assert_board_verified, invoke, require_host_features
from edgec.core.artifact import load_artifact
from edgec.core.numerics import INT8_INPUTS, INT8_NOISE_FACTOR, compare, quantization_step
from edgec.passes import FoldBatchNormPass, QuantizeInt8Pass
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import run_onnxruntime


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory):
    """tests/models.py's tiny MobileNetV2 (depthwise, ReLU6, residual adds), exported to ONNX opset 17."""
    import torch

    from models import build, example_input

    path = tmp_path_factory.mktemp("int8") / "mobilenet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(build("mobilenet"), (example_input("mobilenet"),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["y"])  # fmt: skip
    return path


def calibration(count: int = 16) -> np.ndarray:
    return np.random.default_rng(5).standard_normal((count, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def ort_qdq(float_onnx):
    """The same model quantized by ONNX Runtime (QDQ, per-channel int8 weights, uint8 activations)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": sample[None]} for sample in calibration()])

        def get_next(self):
            return next(self.batches, None)

    path = float_onnx.with_name("mobilenet_ort_qdq.onnx")
    quantize_static(str(float_onnx), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    return path


def test_quantize_pass_build_verified_on_x86(float_onnx, tmp_path):
    model = edgec.load(float_onnx)
    edgec.apply(model, [FoldBatchNormPass(), QuantizeInt8Pass(calibration=calibration(), method="entropy")])
    result = edgec.compile(model, "x86", tmp_path / "int8")
    verification = result.manifest["verification"]
    check = verification["onnxruntime"]
    assert verification["status"] == "passed" and check["within_tolerance"] and check["enforced"]
    assert "QDQ" in check["graph"] and check["rule"].startswith("int8")
    # checked on INT8_INPUTS seeded inputs, the noise of correct implementations recorded for edgec bench
    assert check["inputs"] == INT8_INPUTS and check["worst_seed"] in range(INT8_INPUTS) and check["int8_noise_steps"] >= 0
    assert check["atol"] >= INT8_NOISE_FACTOR * check["int8_noise_steps"] * check["output_step"] * (1 - 1e-9)
    artifact = load_artifact(result.artifact.path)
    compiled = ir.load(str(artifact.onnx))
    assert sum(node.op_type == "QuantizeLinear" for node in compiled.graph) >= 5  # compiled as QDQ, not refolded
    assert any(value.const_value.dtype == ir.DataType.INT8 for value in compiled.graph.initializers.values())
    x = np.random.default_rng(9).standard_normal((1, 3, 32, 32)).astype(np.float32)
    got = LocalRunner(artifact).run([x])[0]
    want = run_onnxruntime(compiled, [x], optimize=False)
    step = quantization_step(want)
    assert compare([got], want, rtol=0.0, atol=step).ok  # one output step on a second input too
    assert not np.allclose(got, LocalRunner(artifact).run([-x])[0], atol=4 * step)  # depends on its input


def test_block_sparse_then_int8_builds_and_verifies(float_onnx, tmp_path):
    """Issue 17 part 5: block-sparse layers stay float (edgec ops), the rest int8; checked against
    ONNX Runtime on the QDQ twin (masked float layers) and the NumPy references, both by the int8 rule."""
    from edgec.passes.registry import parse

    model = edgec.load(float_onnx)
    edgec.apply(model, [FoldBatchNormPass(), parse("block-sparse:n=4,sparsity=0.7"), QuantizeInt8Pass(calibration=calibration())])
    compiled = {node.op_type for node in model.graph.graph}
    assert {"BlockSparseConv", "QuantizeLinear", "DequantizeLinear"} <= compiled
    result = edgec.compile(model, "x86", tmp_path / "sparse_int8")
    verification = result.manifest["verification"]
    assert verification["status"] == "passed"
    for name in ("onnxruntime", "numpy"):
        check = verification[name]
        assert check["enforced"] and check["within_tolerance"] and check["rule"].startswith("int8"), name
    assert "QDQ" in verification["onnxruntime"]["graph"]
    x = np.random.default_rng(9).standard_normal((1, 3, 32, 32)).astype(np.float32)
    artifact = load_artifact(result.artifact.path)
    got = LocalRunner(artifact).run([x])[0]
    want = run_onnxruntime(ir.load(str(artifact.path / "reference.onnx")), [x], optimize=False)
    assert compare([got], want, rtol=0.0, atol=4 * quantization_step(want)).ok


def test_ort_quantized_model_builds_and_verifies_from_the_cli(ort_qdq, tmp_path):
    result = invoke("compile", ort_qdq, "-t", "x86", "-o", tmp_path / "ort_int8", "--json")
    assert result.exit_code == 0, result.output
    manifest = load_artifact(tmp_path / "ort_int8").manifest
    assert manifest["verification"]["onnxruntime"]["within_tolerance"]
    assert manifest["verification"]["onnxruntime"]["rule"].startswith("int8")
    assert_integer_kernels(manifest, ort_qdq)


def assert_integer_kernels(manifest: dict, qdq_path) -> None:
    """Every Conv / Gemm of the QDQ graph runs as an integer kernel (a uint8 activation and int8 constant
    weights among its arguments, one kernel call per layer); no float32 4-D weights left in lib.so."""
    layers = sum(node.op_type in ("Conv", "Gemm", "MatMul") for node in ir.load(str(qdq_path)).graph)
    def is_integer(kernel: dict) -> bool:
        args = kernel["args"]
        return (any(arg["dtype"] == "uint8" and not arg.get("constant") for arg in args)
                and any(arg["dtype"] == "int8" and arg.get("constant") for arg in args))  # fmt: skip

    integer = [kernel for kernel in manifest["kernels"] if ("conv2d" in kernel["kernel"] or "matmul" in kernel["kernel"]) and is_integer(kernel)]
    assert len(integer) == layers, [kernel["kernel"] for kernel in manifest["kernels"]]  # one kernel call per layer
    assert not any(arg["dtype"] == "float32" and arg.get("constant") and len(arg["shape"]) == 4
                   for kernel in manifest["kernels"] for arg in kernel["args"])  # fmt: skip


def test_cortex_a53_int8_build_verified_on_the_emulated_board(ort_qdq, tmp_path):
    result = edgec.compile(edgec.load(ort_qdq), "cortex-a53", tmp_path / "a53")
    assert_board_verified(result.manifest, "cortex-a53")


def test_float_builds_keep_the_float_tolerance(float_onnx, tmp_path):
    result = edgec.compile(edgec.load(float_onnx), "x86", tmp_path / "float")
    check = result.manifest["verification"]["onnxruntime"]
    assert check["graph"] == "model.onnx" and "rule" not in check and "atol" not in check


def test_quantization_step_rule():
    want = [np.array([[-1.0, 0.0, 1.55]], np.float32)]
    step = quantization_step(want)
    assert step == pytest.approx(2.55 / 255)
    assert compare([want[0] + 0.9 * step], want, rtol=0.0, atol=step).ok
    assert not compare([want[0] + 1.5 * step], want, rtol=0.0, atol=step).ok


def test_inspect_shows_which_layers_are_int8_and_their_scales(ort_qdq, float_onnx):
    """`edgec inspect` of a QDQ graph: a row's int8 scales are the graph's own initializers."""
    import json

    graph = ir.load(str(ort_qdq))
    weight_dq = {node.outputs[0].name: node for node in graph.graph if node.op_type == "DequantizeLinear"}
    convs = [node for node in graph.graph if node.op_type in ("Conv", "Gemm")]
    result = invoke("inspect", ort_qdq, "--json")
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert convs and all("int8" in layers[node.name] for node in convs)
    for node in convs:
        scales = weight_dq[node.inputs[1].name].inputs[1].const_value.numpy()
        int8 = layers[node.name]["int8"]
        assert int8["weight_dtype"] == "int8" and int8["channels"] == scales.size
        assert int8["weight_scales"] == [float(scales.min()), float(scales.max())]
        x_scale = weight_dq[node.inputs[0].name].inputs[1].const_value.numpy()
        assert int8["input_scale"] == float(x_scale)
    assert not any("int8" in layer for layer in layers.values() if layer["op"] not in ("Conv", "Gemm"))
    table = invoke("inspect", ort_qdq)
    assert table.exit_code == 0 and "int8 scales" in table.output and f"{len(convs)} of {len(convs)}" in table.output
    plain = invoke("inspect", float_onnx)
    assert plain.exit_code == 0 and "int8 scales" not in plain.output and "int8:" not in plain.output


def test_every_seeded_input_must_pass(float_onnx, tmp_path):
    """compile's int8 check runs INT8_INPUTS seeded inputs: a build wrong on one of them only
    (here: 20 output steps off on the third) is refused, and that input is the one reported."""
    require_host_features("avx512vnni", why=SATURATION)
    from edgec.core.inputs import random_inputs
    from edgec.core.model import input_signatures
    from edgec.runtimes.reference import build_references
    from edgec.verify import Runner, VerifyOptions, _check_int8, _more_int8_samples

    model = edgec.load(float_onnx)
    edgec.apply(model, [FoldBatchNormPass(), QuantizeInt8Pass(calibration=calibration())])
    artifact = load_artifact(edgec.compile(model, "x86", tmp_path / "int8").artifact.path)
    local = LocalRunner(artifact)
    seen = []

    def run(_artifact, inputs):
        outputs = local.run(inputs)
        seen.append(inputs[0])
        if len(seen) == 3:  # the third seeded input
            return [outputs[0] + np.float32(20 * quantization_step(outputs))]
        return outputs

    options = VerifyOptions()
    first = random_inputs(input_signatures(model.graph), options.seed)
    reference = [ref for ref in build_references(model.graph, first)[0] if ref.quantized][0]
    seen.append(first[0])
    more = _more_int8_samples(model, artifact, Runner("test", run), options)
    agreement, entry = _check_int8(options, (local.run(first), reference), more, ["y"])
    assert len(seen) == INT8_INPUTS and entry["inputs"] == INT8_INPUTS
    assert not agreement.ok and entry["worst_seed"] == options.seed + 2
    assert len({x.tobytes() for x in seen}) == INT8_INPUTS  # four different inputs
    right = _more_int8_samples(model, artifact, Runner("test", lambda _, inputs: local.run(inputs)), options)
    agreement, entry = _check_int8(options, (local.run(first), reference), right, ["y"])
    assert agreement.ok and entry["inputs"] == INT8_INPUTS  # the right build passes on all of them

    # two quantized references (an int8 + block-sparse build: the twin under ORT and the NumPy ops):
    # each is judged on every seed against its own outputs, not the first reference's
    def shifted(ref):  # a reference 20 output steps away from the build (its fused run too: same spread)
        step = np.float32(20 * quantization_step(ref.outputs))
        return dataclasses.replace(ref, name="numpy", outputs=[ref.outputs[0] + step],
                                   fused=[ref.fused[0] + step] if ref.fused else ref.fused)

    both = [(seed, outputs, {**refs, "numpy": shifted(refs[reference.name]) if seed == options.seed + 1 else
                             dataclasses.replace(refs[reference.name], name="numpy")})
            for seed, outputs, refs in right]  # fmt: skip
    numpy_ref = dataclasses.replace(reference, name="numpy")
    agreement, entry = _check_int8(options, (local.run(first), numpy_ref), both, ["y"])
    assert not agreement.ok and entry["worst_seed"] == options.seed + 1 and entry["inputs"] == INT8_INPUTS
    agreement, _ = _check_int8(options, (local.run(first), reference), both, ["y"])
    assert agreement.ok
