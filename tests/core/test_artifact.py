"""Artifacts are written atomically: a failed compile leaves nothing behind and
never clobbers a good artifact; load_artifact says what is wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgec
import edgec.build
import edgec.runtimes.reference
from backbone import leftovers, tree_bytes
from edgec.core.artifact import MANIFEST, load_artifact, staging
from edgec.core.errors import ArtifactError, BuildError, VerificationError


@pytest.fixture
def mlp_model(saved_models):
    """The MLP loaded from ONNX (ONNX Runtime is its only reference): the fastest build."""
    return edgec.load(saved_models["mlp"].files["onnx"])


def test_failed_build_leaves_nothing(tmp_path, mlp_model, monkeypatch):
    staged: list[list[str]] = []

    def failing_build(*args, **kwargs):
        staged.append(leftovers(tmp_path))  # what is on disk while the compile is under way
        raise BuildError("injected build failure")

    monkeypatch.setattr(edgec.build, "build", failing_build)
    output = tmp_path / "model_x86"
    with pytest.raises(BuildError, match="injected"):
        edgec.compile(mlp_model, "x86", output)
    assert len(staged) == 1 and len(staged[0]) == 1
    assert staged[0][0].startswith(".model_x86.tmp-")  # the compile was staging when it failed...
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []  # ...and removed the staging directory


def test_failed_verification_leaves_nothing(tmp_path, mlp_model, monkeypatch):
    real = edgec.runtimes.reference.run_onnxruntime

    def off_by_one(graph, inputs, **options):
        return [array + 1.0 for array in real(graph, inputs, **options)]

    # the reference every compile and bench checks a standard graph against (build_references)
    monkeypatch.setattr(edgec.runtimes.reference, "run_onnxruntime", off_by_one)
    output = tmp_path / "model_x86"
    with pytest.raises(VerificationError) as error:
        edgec.compile(mlp_model, "x86", output)
    message = str(error.value)
    assert "onnxruntime" in message and "no artifact was written" in message and "--no-verify" in message
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_pytorch_verification(tmp_path, saved_models):
    saved = saved_models["mlp"]
    model = edgec.load(saved.files["torchscript"], input_shape=saved.shape)
    real = model.torch_reference
    model.torch_reference = lambda *arrays: [array * 1.01 for array in real(*arrays)]
    output = tmp_path / "model_x86"
    with pytest.raises(VerificationError, match="pytorch"):
        edgec.compile(model, "x86", output)
    assert list(tmp_path.iterdir()) == []
    # with verification off the same model compiles
    result = edgec.compile(model, "x86", output, verify=False)
    assert result.manifest["verification"] == {"status": "skipped", "reason": "--no-verify"}


def test_good_artifact_survives_failed_recompile(tmp_path, mlp_model, monkeypatch):
    output = tmp_path / "model_x86"
    edgec.compile(mlp_model, "x86", output)
    before = tree_bytes(output)
    assert {"lib.so", "model.onnx", MANIFEST} <= set(before)

    def failing_build(*args, **kwargs):
        raise BuildError("injected")

    monkeypatch.setattr(edgec.build, "build", failing_build)
    with pytest.raises(BuildError):
        edgec.compile(mlp_model, "x86", output)
    assert tree_bytes(output) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model_x86"]

    monkeypatch.undo()
    monkeypatch.setattr(
        edgec.runtimes.reference, "run_onnxruntime", lambda graph, inputs, **_: [np.full((1, 10), 1e3, np.float32)]
    )
    with pytest.raises(VerificationError):
        edgec.compile(mlp_model, "x86", output)
    assert tree_bytes(output) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model_x86"]
    # and it still runs
    from edgec.runtimes.local import LocalRunner

    x = np.zeros((1, 48), np.float32)
    assert LocalRunner(load_artifact(output)).run([x])[0].shape == (1, 10)


def test_recompile_replaces_an_artifact(tmp_path, saved_models):
    output = tmp_path / "model_x86"
    edgec.compile(edgec.load(saved_models["mlp"].files["onnx"]), "x86", output)
    old = tree_bytes(output)
    result = edgec.compile(edgec.load(saved_models["vgg"].files["onnx"]), "x86", output)
    assert tree_bytes(output)["lib.so"] != old["lib.so"]
    assert load_artifact(output).manifest["inputs"][0]["shape"] == [1, 3, 32, 32]
    assert result.artifact.path == output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model_x86"]  # no .old- directory left


def test_refuses_to_overwrite_a_non_artifact_directory(tmp_path, mlp_model):
    output = tmp_path / "results"
    output.mkdir()
    (output / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError) as error:
        edgec.compile(mlp_model, "x86", output)
    assert "not an edgec artifact" in str(error.value) and "refusing to overwrite" in str(error.value)
    assert tree_bytes(output) == {"thesis.tex": b"precious"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results"]


def test_refuses_to_overwrite_a_file(tmp_path, mlp_model):
    output = tmp_path / "model_x86"
    output.write_text("not a directory")
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        edgec.compile(mlp_model, "x86", output)
    assert output.read_text() == "not a directory"


def test_empty_directory_is_used(tmp_path, mlp_model):
    output = tmp_path / "model_x86"
    output.mkdir()
    edgec.compile(mlp_model, "x86", output)
    assert load_artifact(output).manifest["target"]["preset"] == "x86"


def test_staging_cleans_up_on_interrupt(tmp_path):
    output = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with staging(output) as directory:
            (directory / "lib.so").write_bytes(b"half")
            assert directory.parent == tmp_path and directory.name.startswith(".out.tmp-")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_staging_renames_into_place(tmp_path):
    output = tmp_path / "nested" / "out"
    with staging(output) as directory:
        (directory / "a.txt").write_text("a")
        assert not output.exists()  # nothing visible until the block succeeds
    assert tree_bytes(output) == {"a.txt": b"a"}
    assert leftovers(output.parent) == []


# --- load_artifact ---


@pytest.fixture
def artifact_copy(artifacts, tmp_path):
    source = artifacts.get("mlp", "x86").artifact.path
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    return copy


def test_load_artifact_ok(artifact_copy):
    artifact = load_artifact(artifact_copy)
    assert artifact.lib == artifact_copy / "lib.so"
    assert artifact.target_name == "x86"
    assert artifact.inputs[0]["shape"] == [1, 48]


def test_load_artifact_missing_dir(tmp_path):
    with pytest.raises(ArtifactError) as error:
        load_artifact(tmp_path / "nope")
    assert "does not exist" in str(error.value) and "edgec compile" in str(error.value)


def test_load_artifact_missing_manifest(artifact_copy):
    (artifact_copy / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="not an edgec artifact: it has no manifest.json"):
        load_artifact(artifact_copy)


def test_load_artifact_bad_manifest(artifact_copy):
    (artifact_copy / MANIFEST).write_text("{truncated")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(artifact_copy)


@pytest.mark.parametrize("missing", ["lib.so", "model.onnx"])
def test_load_artifact_missing_file(artifact_copy, missing):
    assert missing in json.loads((artifact_copy / MANIFEST).read_text())["files"]
    (artifact_copy / missing).unlink()
    with pytest.raises(ArtifactError) as error:
        load_artifact(artifact_copy)
    assert f"{missing} is missing" in str(error.value) and "recompile" in str(error.value)
