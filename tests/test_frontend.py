"""edgec.load: every model from every format, numerically equal to PyTorch, and
a clear EdgecError (with what to do) for every bad input."""

from __future__ import annotations

import collections
import hashlib
import zipfile

import numpy as np
import onnx_ir as ir
import pytest

import edgec
from backbone import ATOL, FORMATS, RTOL, SOURCE_FORMAT
from edgec.core import shapes
from edgec.core.errors import EdgecError, InputShapeError, LoadError


def run_ort(model, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime on the loaded graph, built here (not through edgec's reference helper)."""
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model.graph)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs, strict=True)))


def seeded_inputs(shape, seeds=(0, 1)) -> list[np.ndarray]:
    return [np.random.default_rng(seed).standard_normal(shape).astype(np.float32) for seed in seeds]


def batch_norm_count(module) -> int:
    import torch

    return sum(isinstance(child, torch.nn.BatchNorm2d) for child in module.modules())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["mobilenet", "resnet", "vgg", "mlp"])
def test_every_model_loads_from_every_format(saved_models, name, fmt):
    saved = saved_models[name]
    path = saved.files[fmt]
    model = edgec.load(path, **saved.load_kwargs(fmt))

    assert model.source_format == SOURCE_FORMAT[fmt]
    assert model.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(model.graph.graph.inputs) == 1
    assert list(model.graph.graph.inputs[0].shape) == list(saved.shape)
    assert len(model.graph.graph.outputs) == 1
    # batch norms are left for the fold-bn pass, not fused while loading
    ops = collections.Counter(node.op_type for node in model.graph.graph)
    assert ops["BatchNormalization"] == batch_norm_count(saved.module)

    # the ONNX graph edgec holds runs in ONNX Runtime and equals PyTorch (rtol=atol=1e-4)
    for x in seeded_inputs(saved.shape):
        (got,) = run_ort(model, [x])
        want = saved.torch_outputs(x)
        assert got.shape == want.shape == (1, 10)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        if fmt != "onnx":
            (reference,) = model.torch_reference(x)
            np.testing.assert_allclose(reference, want, rtol=RTOL, atol=ATOL)
    if fmt == "onnx":
        assert model.torch_reference is None


def test_bn_running_stats_are_real(saved_models):
    """The models' BatchNorms are not identities, so a BN bug would show numerically."""
    import torch

    for name in ("mobilenet", "resnet", "vgg"):
        norms = [m for m in saved_models[name].module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms
        for norm in norms:
            assert not torch.allclose(norm.running_mean, torch.zeros_like(norm.running_mean))
            assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))


def test_dynamic_batch_onnx_with_input_shape(saved_models, dynamic_batch_onnx):
    saved = saved_models["resnet"]
    model = edgec.load(dynamic_batch_onnx, input_shape="x:2,3,32,32")
    assert list(model.graph.graph.inputs[0].shape) == [2, 3, 32, 32]
    assert list(model.graph.graph.outputs[0].shape) == [2, 10]
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    (got,) = run_ort(model, [x])
    np.testing.assert_allclose(got, saved.torch_outputs(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "given",
    [(1, 3, 32, 32), "1,3,32,32", "1x3x32x32", "x:1,3,32,32", ["x:1,3,32,32"], {"x": (1, 3, 32, 32)}, [(1, 3, 32, 32)]],
)
def test_input_shape_spellings(dynamic_batch_onnx, given):
    model = edgec.load(dynamic_batch_onnx, input_shape=given)
    assert list(model.graph.graph.inputs[0].shape) == [1, 3, 32, 32]


def test_normalize_shapes():
    assert shapes.normalize(None) == {}
    assert shapes.normalize((1, 3, 8, 8)) == {0: (1, 3, 8, 8)}
    assert shapes.normalize(["a:1,2", "3,4"]) == {"a": (1, 2), 1: (3, 4)}
    assert shapes.parse_shape("input.1:1x3x8x8") == ("input.1", (1, 3, 8, 8))


# --- bad inputs: each a LoadError / InputShapeError whose message says what to do ---


def check_error(error: pytest.ExceptionInfo, *words: str) -> str:
    assert isinstance(error.value, EdgecError)
    message = str(error.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def test_missing_file(tmp_path):
    with pytest.raises(LoadError) as error:
        edgec.load(tmp_path / "nope.pt")
    check_error(error, "nope.pt", "does not exist")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(LoadError) as error:
        edgec.load(tmp_path)
    check_error(error, "directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(LoadError) as error:
        edgec.load(path, input_shape=(1, 3, 32, 32))
    check_error(error, "empty")


@pytest.mark.parametrize("fmt", ["torchscript", "export", "pickle"])
def test_truncated_torch_archive(saved_models, tmp_path, fmt):
    saved = saved_models["resnet"]
    data = saved.files[fmt].read_bytes()
    path = tmp_path / f"truncated{saved.files[fmt].suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError) as error:
        edgec.load(path, **saved.load_kwargs(fmt))
    check_error(error, "corrupt or truncated", "save it again")


def test_corrupt_onnx_random_bytes(tmp_path):
    data = np.random.default_rng(0).bytes(4096)
    assert data[:2] != b"PK" and data[0] != 0x80  # not sniffed as a zip or a pickle
    path = tmp_path / "random.onnx"
    path.write_bytes(data)
    with pytest.raises(LoadError) as error:
        edgec.load(path)
    check_error(error, "random.onnx", "corrupt")


def test_truncated_onnx(saved_models, tmp_path):
    data = saved_models["vgg"].files["onnx"].read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError) as error:
        edgec.load(path)
    check_error(error, "half.onnx", "corrupt")


def test_zip_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "hello")
    with pytest.raises(LoadError) as error:
        edgec.load(path, input_shape=(1, 3, 32, 32))
    check_error(error, "not a PyTorch model", "readme.txt")


def test_bare_state_dict(saved_models, tmp_path):
    import torch

    path = tmp_path / "weights.pt"
    torch.save(saved_models["resnet"].module.state_dict(), path)
    for trust in (False, True):
        with pytest.raises(LoadError) as error:
            edgec.load(path, input_shape=(1, 3, 32, 32), trust_pickle=trust)
        check_error(error, "state_dict", "architecture", "torch.jit.save", "torch.export")


def test_pickled_module_needs_trust_pickle(saved_models):
    saved = saved_models["resnet"]
    with pytest.raises(LoadError) as error:
        edgec.load(saved.files["pickle"], input_shape=saved.shape)
    check_error(error, "--trust-pickle", "arbitrary code", "TorchScript")


class _Payload:
    """Unpickling this creates a file: proof of code execution."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_untrusted_pickle_runs_no_code(tmp_path):
    import torch

    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(_Payload(str(sentinel)), path)
    with pytest.raises(LoadError) as error:
        edgec.load(path, input_shape=(1, 3, 32, 32))
    check_error(error, "--trust-pickle")
    assert not sentinel.exists()
    # trusted, it runs (that is what the flag means) and then is refused as not a module
    with pytest.raises(LoadError) as error:
        edgec.load(path, input_shape=(1, 3, 32, 32), trust_pickle=True)
    check_error(error, "not a torch.nn.Module")
    assert sentinel.exists()


@pytest.mark.parametrize("fmt", ["torchscript", "pickle"])
def test_torch_module_without_input_shape(saved_models, fmt):
    saved = saved_models["mlp"]
    with pytest.raises(InputShapeError) as error:
        edgec.load(saved.files[fmt], trust_pickle=True)
    check_error(error, "--input-shape", "input shape")


def test_torchscript_with_a_shape_the_model_rejects(saved_models):
    with pytest.raises(LoadError) as error:
        edgec.load(saved_models["resnet"].files["torchscript"], input_shape=(1, 4, 32, 32))
    check_error(error, "1,4,32,32", "--input-shape", "channels")  # PyTorch's own reason, not the exporter's


def test_dynamic_batch_onnx_without_input_shape(dynamic_batch_onnx):
    with pytest.raises(InputShapeError) as error:
        edgec.load(dynamic_batch_onnx)
    check_error(error, "'x'", "dynamic shape", "batch", "--input-shape")


@pytest.mark.parametrize(
    ("fmt", "given", "words"),
    [
        ("onnx", "1,3,64,64", ("fixed shape", "1x3x32x32", "contradicts")),
        ("onnx", "1,3,32", ("rank 4", "3 dims")),
        ("onnx", "image:1,3,32,32", ("'image'", "inputs: x")),
        ("export", "1,3,64,64", ("exported for input shape (1, 3, 32, 32)", "(1, 3, 64, 64)", "Re-export")),
    ],
)
def test_contradicting_input_shape(saved_models, fmt, given, words):
    with pytest.raises(InputShapeError) as error:
        edgec.load(saved_models["resnet"].files[fmt], input_shape=given)
    check_error(error, *words)


def test_matching_input_shape_is_accepted(saved_models):
    for fmt in ("onnx", "export"):
        model = edgec.load(saved_models["resnet"].files[fmt], input_shape="1,3,32,32")
        assert list(model.graph.graph.inputs[0].shape) == [1, 3, 32, 32]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("1,a,32,32", ("'1,a,32,32'", "comma-separated integers")),
        ("abc", ("'abc'", "comma-separated integers")),
        ("x:1;3;32;32", ("comma-separated integers",)),
        ("0,3,32,32", ("'0,3,32,32'", "positive integer")),
        ("-1,3,32,32", ("positive integer",)),
        ("", ("empty input shape", "e.g. 1,3,224,224")),
        ("x:", ("empty input shape 'x:'",)),
    ],
)
def test_bad_input_shape_strings(saved_models, text, words):
    with pytest.raises(InputShapeError) as error:
        edgec.load(saved_models["resnet"].files["onnx"], input_shape=text)
    check_error(error, *words)


def test_from_onnx_ir_cleans_and_checks():
    """A graph built in Python gets the same checks: a symbolic dim is refused."""
    x = ir.Value(name="x", shape=ir.Shape(["n", 4]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Relu", [x], num_outputs=1)
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 17}, name="g")
    with pytest.raises(InputShapeError) as error:
        edgec.from_onnx_ir(ir.Model(graph, ir_version=8))
    check_error(error, "'x'", "dynamic shape")


def _save_with_external_data(source, directory):
    """``source`` (an ONNX file) saved into ``directory`` with its weights in ``weights.bin``."""
    import onnx

    directory.mkdir()
    proto = onnx.load(str(source))
    onnx.save_model(proto, str(directory / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=64)
    return directory / "model.onnx"


def test_external_data_is_read_from_the_model_directory(saved_models, tmp_path, monkeypatch):
    source = saved_models["mobilenet"].files["onnx"]
    path = _save_with_external_data(source, tmp_path / "ext")
    import onnx

    stored = onnx.load(str(path), load_external_data=False).graph.initializer
    assert sum(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in stored) >= 5  # the weights are outside
    monkeypatch.chdir(tmp_path)  # not the model's directory: locations are relative to the .onnx file
    model = edgec.load(path)
    inline = edgec.load(source)
    weights = {value.name: value.const_value.numpy() for value in model.graph.graph.initializers.values()}
    expected = {value.name: value.const_value.numpy() for value in inline.graph.graph.initializers.values()}
    assert weights.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array)
    saved = tmp_path / "copy.onnx"  # held in memory: saved whole, without the data file
    ir.save(model.graph, str(saved))
    assert not any(tensor.data_location for tensor in onnx.load(str(saved)).graph.initializer)


def test_missing_external_data_names_the_file(saved_models, tmp_path):
    path = _save_with_external_data(saved_models["mobilenet"].files["onnx"], tmp_path / "ext")
    (tmp_path / "ext" / "weights.bin").unlink()
    with pytest.raises(LoadError, match=r"external data \(weights.bin\).*next to the .onnx file"):
        edgec.load(path)
