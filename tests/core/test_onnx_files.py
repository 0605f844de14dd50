"""Graphs over protobuf's 2 GiB: model.onnx with its weights in model.onnx.data, ONNX Runtime
from a file, the TorchScript export through a file. The limit is lowered here so that the test
models take the large-model path (a 2.5 GB model is bench/torchvision_corpus.py's work)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import edgec
from backbone import invoke
from edgec.core import onnx_files
from edgec.core.artifact import MANIFEST, load_artifact
from edgec.core.ort import onnxruntime_session


@pytest.fixture
def tiny_limit(monkeypatch):
    """Every graph with more than 1 KiB of weights counts as over the limit."""
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", onnx_files.GRAPH_HEADROOM + 1024)


@pytest.fixture
def mlp(saved_models):
    return saved_models["mlp"]


def _weights(graph: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy() for name, value in graph.graph.initializers.items()}


def test_small_graphs_stay_one_file(mlp, tmp_path):
    graph = edgec.load(mlp.files["onnx"]).graph
    assert onnx_files.fits_one_message(graph)
    assert onnx_files.save(graph, tmp_path / "model.onnx") == [tmp_path / "model.onnx"]
    assert not onnx_files.data_file(tmp_path / "model.onnx").exists()
    assert onnx_files.serialized(graph, 13) is not None


def test_large_graph_keeps_its_weights_beside_it(mlp, tmp_path, tiny_limit):
    graph = edgec.load(mlp.files["onnx"]).graph
    weights = _weights(graph)
    assert onnx_files.weight_bytes(graph) == sum(array.nbytes for array in weights.values()) > 1024
    assert not onnx_files.fits_one_message(graph) and onnx_files.serialized(graph, 13) is None
    path = tmp_path / "model.onnx"
    written = onnx_files.save(graph, path)
    assert written == [path, tmp_path / "model.onnx.data"]
    stored = onnx.load(str(path), load_external_data=False).graph.initializer
    outside = [tensor.name for tensor in stored if tensor.data_location == onnx.TensorProto.EXTERNAL]
    assert outside and all(entry.value == "model.onnx.data" for tensor in stored for entry in tensor.external_data if entry.key == "location")
    assert path.stat().st_size < written[1].stat().st_size  # the graph in one file, the weights in the other
    reloaded = _weights(ir.load(path))
    assert reloaded.keys() == weights.keys() and all(np.array_equal(reloaded[name], weights[name]) for name in weights)
    assert all(not isinstance(value.const_value, ir.ExternalTensor) for value in graph.graph.initializers.values())


def test_a_smaller_model_removes_the_stale_data_file(mlp, tmp_path, monkeypatch):
    graph = edgec.load(mlp.files["onnx"]).graph
    path = tmp_path / "model.onnx"
    with monkeypatch.context() as patch:
        patch.setattr(onnx_files, "PROTOBUF_LIMIT", onnx_files.GRAPH_HEADROOM + 1024)
        onnx_files.save(graph, path)
    assert onnx_files.data_file(path).exists()
    onnx_files.save(graph, path)
    assert not onnx_files.data_file(path).exists()
    assert _weights(ir.load(path)).keys() == _weights(graph).keys()


def test_onnxruntime_opens_a_graph_that_reads_external_data(mlp, tmp_path):
    """A graph loaded from model.onnx + model.onnx.data (bench's reference) under the limit."""
    graph = edgec.load(mlp.files["onnx"]).graph
    ir.save(graph, tmp_path / "model.onnx", external_data="model.onnx.data")
    session = onnxruntime_session(ir.load(tmp_path / "model.onnx"))
    (output,) = session.run(None, {session.get_inputs()[0].name: mlp.example})
    np.testing.assert_allclose(output, mlp.torch_outputs(mlp.example), rtol=1e-5, atol=1e-6)


def test_onnxruntime_opens_a_large_graph_from_a_file(mlp, tiny_limit):
    graph = edgec.load(mlp.files["onnx"]).graph
    version = graph.ir_version
    session = onnxruntime_session(graph)
    (output,) = session.run(None, {session.get_inputs()[0].name: mlp.example})
    np.testing.assert_allclose(output, mlp.torch_outputs(mlp.example), rtol=1e-5, atol=1e-6)
    assert graph.ir_version == version  # capped for ORT in the file only


def test_compile_and_bench_a_large_model(saved_models, tmp_path, tiny_limit):
    """TorchScript export through a file, verification by ORT from a file, model.onnx.data hashed
    in the manifest, and bench's reference check reading it back."""
    saved = saved_models["resnet"]
    model = edgec.load(saved.files["torchscript"], input_shape=saved.shape)
    edgec.compile(model, "x86", tmp_path / "big")
    manifest = json.loads((tmp_path / "big" / MANIFEST).read_text())
    assert {"model.onnx", "model.onnx.data"} <= set(manifest["files"]) and "model.onnx.data" in manifest["sha256"]
    checks = manifest["verification"]
    assert checks["status"] == "passed" and checks["onnxruntime"]["within_tolerance"] and checks["pytorch"]["within_tolerance"]
    load_artifact(tmp_path / "big")
    bench = invoke("bench", tmp_path / "big", "--local", "--repeat", "1", "--warmup", "0", "--json")
    assert bench.exit_code == 0, bench.output
    assert json.loads(bench.stdout)["check"]["ok"]
