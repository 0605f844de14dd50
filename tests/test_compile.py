"""edgec.compile: x86 builds equal ONNX Runtime and PyTorch; cross builds are ELF
for the right machine; CUDA builds hold kernels; manifest.json; unsupported ops."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest

import edgec
from backbone import ATOL, RTOL, SOURCE_FORMAT, X86_SOURCE, assert_board_verified, elf_header
from edgec.core.artifact import load_artifact
from edgec.core.errors import UnsupportedOpError
from edgec.lower import supported_onnx_ops
from edgec.runtimes.local import LocalRunner

EM_ARM, EM_X86_64, EM_AARCH64 = 40, 62, 183
ELFCLASS32, ELFCLASS64 = 1, 2
ET_DYN = 3

MODEL_NAMES = ["mobilenet", "resnet", "vgg", "mlp"]


def ort_outputs(onnx_path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_x86_outputs_equal_onnxruntime_and_pytorch(artifacts, saved_models, name):
    result = artifacts.get(name, "x86")
    saved = saved_models[name]
    artifact = load_artifact(result.artifact.path)
    runner = LocalRunner(artifact)
    for seed in (0, 1):
        x = np.random.default_rng(seed).standard_normal(saved.shape).astype(np.float32)
        (got,) = runner.run([x])
        (from_ort,) = ort_outputs(artifact.onnx, x)
        from_torch = saved.torch_outputs(x)
        assert got.shape == from_torch.shape == (1, 10)
        np.testing.assert_allclose(got, from_ort, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got, from_torch, rtol=RTOL, atol=ATOL)
        # the outputs depend on the input (a constant output would pass a loose check)
        assert not np.allclose(got, runner.run([-x])[0], rtol=RTOL, atol=ATOL)

    verification = artifact.manifest["verification"]
    assert verification["status"] == "passed"
    assert (verification["rtol"], verification["atol"]) == (1e-4, 1e-4)
    assert verification["onnxruntime"]["within_tolerance"]
    assert verification["onnxruntime"]["max_abs"] <= 1e-4 + 1e-4 * np.abs(got).max()
    if X86_SOURCE[name] != "onnx":  # PyTorch sources are checked against PyTorch too
        assert verification["pytorch"]["within_tolerance"] and verification["pytorch"]["enforced"]
    else:
        assert "pytorch" not in verification


def test_manifest_fields(artifacts, saved_models):
    result = artifacts.get("resnet", "x86")
    saved = saved_models["resnet"]
    path = result.artifact.path
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest == result.manifest

    assert manifest["edgec_version"] == edgec.__version__
    import tvm

    assert manifest["tvm_version"] == tvm.__version__
    assert manifest["target"]["preset"] == "x86"
    assert manifest["target"]["tvm"] == edgec.targets.resolve("x86").tvm_json
    assert manifest["target"]["tvm"]["kind"] == "llvm"
    assert manifest["target"]["tvm"]["mcpu"] != "native"
    assert manifest["target"]["host_runnable"] is True

    assert manifest["inputs"] == [{"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert len(manifest["outputs"]) == 1
    assert manifest["outputs"][0]["shape"] == [1, 10] and manifest["outputs"][0]["dtype"] == "float32"

    source = manifest["source"]
    assert source["format"] == SOURCE_FORMAT[X86_SOURCE["resnet"]]
    assert source["path"] == str(saved.files[X86_SOURCE["resnet"]])
    assert source["sha256"] == hashlib.sha256(saved.files[X86_SOURCE["resnet"]].read_bytes()).hexdigest()
    assert manifest["onnx"]["file"] == "model.onnx"
    assert manifest["onnx"]["sha256"] == hashlib.sha256((path / "model.onnx").read_bytes()).hexdigest()
    assert manifest["passes"] == []
    assert manifest["stats"]["params"] > 0 and manifest["stats"]["macs"] > 0

    assert set(manifest["files"]) == {"lib.so", "model.onnx"}
    for name in manifest["files"]:
        assert (path / name).is_file() and (path / name).stat().st_size > 0
    assert sorted(p.name for p in path.iterdir()) == sorted([*manifest["files"], "manifest.json"])


def test_model_onnx_is_the_compiled_graph(artifacts, saved_models):
    """model.onnx holds the graph with its input/output names and static shapes."""
    result = artifacts.get("mobilenet", "x86")
    graph = ir.load(str(result.artifact.onnx))
    assert [value.name for value in graph.graph.inputs] == [spec["name"] for spec in result.manifest["inputs"]]
    assert [value.name for value in graph.graph.outputs] == [spec["name"] for spec in result.manifest["outputs"]]
    assert list(graph.graph.inputs[0].shape) == [1, 3, 32, 32]


def test_x86_lib_is_x86_64_elf(artifacts):
    header = elf_header(artifacts.get("mlp", "x86").artifact.lib)
    assert header == {"class": ELFCLASS64, "data": 1, "type": ET_DYN, "machine": EM_X86_64}


def _needs(tool: str):
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed")


@pytest.mark.parametrize(
    ("name", "target", "tool", "header"),
    [
        pytest.param(
            "mobilenet", "cortex-a7", "arm-linux-gnueabihf-g++",
            {"class": ELFCLASS32, "data": 1, "type": ET_DYN, "machine": EM_ARM},
            marks=_needs("arm-linux-gnueabihf-g++"),
        ),
        pytest.param(
            "resnet", "cortex-a53", "aarch64-linux-gnu-g++",
            {"class": ELFCLASS64, "data": 1, "type": ET_DYN, "machine": EM_AARCH64},
            marks=_needs("aarch64-linux-gnu-g++"),
        ),
    ],
)
def test_cross_compile_elf_header(artifacts, name, target, tool, header):
    result = artifacts.get(name, target)
    path = result.artifact.path
    assert elf_header(path / "lib.so") == header
    manifest = result.manifest
    assert manifest["target"]["tvm"]["mtriple"] == edgec.targets.PRESETS[target].mtriple
    assert manifest["target"]["host_runnable"] is False
    assert_board_verified(manifest, target)
    with pytest.raises(edgec.core.errors.ArtifactError, match=target):
        LocalRunner(load_artifact(path))


def test_cuda_build(artifacts):
    result = artifacts.get("resnet", "cuda")
    path = result.artifact.path
    manifest = result.manifest
    assert manifest["target"]["tvm"] == {"kind": "cuda", "arch": "sm_80"}
    assert manifest["target"]["host"]["kind"] == "llvm"
    source = (path / "kernels.cu").read_text()
    assert source.count("__global__") >= 5  # one per fused kernel; the ResNet has 6 convolutions
    assert "kernels.cu" in manifest["files"]
    if shutil.which("nvcc"):
        fatbin = path / "kernels.fatbin"
        assert fatbin.is_file() and fatbin.stat().st_size > 0
        assert "kernels.fatbin" in manifest["files"]
    # the host side of a CUDA artifact is x86-64 code
    assert elf_header(path / "lib.so")["machine"] == EM_X86_64
    assert manifest["verification"]["status"] == "skipped"


@pytest.mark.gpu
def test_cuda_run_on_gpu(artifacts, saved_models):
    """Built for sm_80 (the default): runs on any GPU of compute capability 8.0 or newer."""
    result = artifacts.get("resnet", "cuda")
    runner = LocalRunner(load_artifact(result.artifact.path))  # GPU 0, through edgec's CUDA loading
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    (got,) = runner.run([x])
    np.testing.assert_allclose(got, saved_models["resnet"].torch_outputs(x), rtol=RTOL, atol=ATOL)


# --- unsupported operators ---

UNSUPPORTED_STANDARD_OP = "Celu"  # in ONNX since opset 12; TVM's Relax ONNX frontend has no converter


def _graph_with(nodes_spec) -> edgec.Model:
    """x[1,8] -> Relu -> the given (domain, op, name) nodes in a chain -> y."""
    x = ir.Value(name="x", shape=ir.Shape([1, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    relu = ir.Node("", "Relu", [x], num_outputs=1, name="relu0")
    nodes = [relu]
    current = relu.outputs[0]
    for domain, op, name in nodes_spec:
        node = ir.Node(domain, op, [current], num_outputs=1, name=name)
        node.outputs[0].shape = ir.Shape([1, 8])
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        nodes.append(node)
        current = node.outputs[0]
    current.name = "y"
    opsets = {"": 17, **{domain: 1 for domain, _, _ in nodes_spec if domain}}
    graph = ir.Graph([x], [current], nodes=nodes, opset_imports=opsets, name="unsupported")
    return edgec.from_onnx_ir(ir.Model(graph, ir_version=8))


def test_unsupported_ops_are_named(tmp_path):
    assert UNSUPPORTED_STANDARD_OP not in supported_onnx_ops()
    assert {"Conv", "Relu", "Add", "Gemm", "BatchNormalization", "MaxPool"} <= supported_onnx_ops()
    model = _graph_with([("", UNSUPPORTED_STANDARD_OP, "celu_7"), ("com.acme", "Frobnicate", "frob_1")])
    output = tmp_path / "out"
    with pytest.raises(UnsupportedOpError) as error:
        edgec.compile(model, "x86", output)
    message = str(error.value)
    assert "2 node(s)" in message
    assert "Celu (node 'celu_7')" in message
    assert "com.acme.Frobnicate (node 'frob_1')" in message
    assert "Relu" not in message
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left either


def test_supported_graph_compiles(tmp_path):
    """The same builder with a supported op compiles: the refusal above is about the op."""
    model = _graph_with([("", "Sigmoid", "sig_1")])
    result = edgec.compile(model, "x86", tmp_path / "ok")
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(1, 8)
    (got,) = LocalRunner(result.artifact).run([x])
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-np.maximum(x, 0))), rtol=RTOL, atol=ATOL)
    assert result.manifest["source"]["format"] == "onnx-ir"


def test_onnx_file_of_newest_ir_version_compiles_and_verifies(tmp_path):
    """onnx 1.23 writes IR 14, which the pinned onnxruntime refuses: verification must still run."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [8, 4], np.linspace(-1, 1, 32, dtype=np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "ir14",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert proto.ir_version == 14
    onnx.save(proto, tmp_path / "m.onnx")
    result = edgec.compile(edgec.load(tmp_path / "m.onnx"), "x86", tmp_path / "out")
    verification = result.manifest["verification"]
    assert verification["status"] == "passed" and verification["onnxruntime"]["within_tolerance"] is True
