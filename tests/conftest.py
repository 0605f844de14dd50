"""Shared fixtures: the tiny models saved once per session in every format, and
their x86 artifacts compiled once per session.

Formats (``FORMATS``):
    torchscript  torch.jit.save(torch.jit.script(m))          model.pt
    export       torch.export.save(torch.export.export(m))    model.pt2
    onnx         torch.onnx.export(..., dynamo=False)          model.onnx
    pickle       torch.save(m)  (loads only with trust_pickle) model.pkl
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import models  # noqa: E402 - tests/ on sys.path first
from backbone import FORMATS, SUFFIX, X86_SOURCE  # noqa: E402

def gpu_available() -> bool:
    """An NVIDIA GPU answers nvidia-smi (CUDA-enabled TVM is checked by the test itself)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "GPU" in done.stdout


@pytest.fixture(autouse=True)
def _restore_tvm_num_threads(monkeypatch):
    """CLI commands set TVM_NUM_THREADS in this process (--threads); undo it after each test."""
    before = os.environ.get("TVM_NUM_THREADS")
    monkeypatch.setenv("TVM_NUM_THREADS", before or "0")  # records what to restore, even "unset"
    if before is None:
        monkeypatch.delenv("TVM_NUM_THREADS")


@pytest.fixture
def restore_logging():
    """The CLI configures logging (basicConfig(force=True), -v levels) and warning filters:
    put them back so later tests do not log into a closed CliRunner stream."""
    root = logging.getLogger()
    names = ("edgec", "torch", "onnxscript", "onnx_ir", "tvm")
    saved = (list(root.handlers), root.level, {name: logging.getLogger(name).level for name in names})
    with warnings.catch_warnings():
        yield
    handlers, level, levels = saved
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi does not work here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclasses.dataclass
class SavedModel:
    """One test model: the module, a seeded example input, and its files per format."""

    name: str
    module: object
    example: np.ndarray
    files: dict[str, Path]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.example.shape)

    def load_kwargs(self, fmt: str) -> dict:
        """What edgec.load needs besides the path for ``fmt``."""
        if fmt == "torchscript":
            return {"input_shape": self.shape}
        if fmt == "pickle":
            return {"input_shape": self.shape, "trust_pickle": True}
        return {}

    def torch_outputs(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.module(torch.from_numpy(x)).numpy()


def save_all_formats(name: str, directory: Path) -> SavedModel:
    import torch

    module = models.build(name)
    x = models.example_input(name)
    files = {fmt: directory / f"{name}{SUFFIX[fmt]}" for fmt in FORMATS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(files["torchscript"]))
        torch.export.save(torch.export.export(module, (x,)), str(files["export"]))
        torch.onnx.export(
            module,
            (x,),
            str(files["onnx"]),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            training=torch.onnx.TrainingMode.PRESERVE,  # keep BatchNormalization nodes in the file
        )
        torch.save(module, str(files["pickle"]))
    return SavedModel(name, module, x.numpy(), files)


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[str, SavedModel]:
    """Every test model saved in every format, once per session."""
    directory = tmp_path_factory.mktemp("models")
    return {name: save_all_formats(name, directory) for name in models.MODELS}


@pytest.fixture(scope="session")
def dynamic_batch_onnx(saved_models, tmp_path_factory) -> Path:
    """The ResNet as ONNX with a symbolic batch dimension ('batch' x 3 x 32 x 32)."""
    import torch

    saved = saved_models["resnet"]
    path = tmp_path_factory.mktemp("dynamic") / "resnet_dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            saved.module,
            (torch.from_numpy(saved.example),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    return path


class ArtifactCache:
    """Compiles (model, target) once per session into one directory."""

    def __init__(self, saved_models: dict[str, SavedModel], root: Path):
        self.saved_models = saved_models
        self.root = root
        self.results: dict[tuple[str, str], object] = {}

    def get(self, name: str, target: str, fmt: str | None = None):
        import edgec

        fmt = fmt or X86_SOURCE[name]
        key = (name, target)
        if key not in self.results:
            saved = self.saved_models[name]
            model = edgec.load(saved.files[fmt], **saved.load_kwargs(fmt))
            self.results[key] = edgec.compile(model, target, self.root / f"{name}_{target.replace(':', '_')}")
        return self.results[key]


@pytest.fixture(scope="session")
def artifacts(saved_models, tmp_path_factory) -> ArtifactCache:
    """``artifacts.get("resnet", "x86")`` -> the CompileResult, compiled once per session."""
    return ArtifactCache(saved_models, tmp_path_factory.mktemp("artifacts"))
