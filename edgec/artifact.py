"""The artifact directory: ``lib.so`` + ``manifest.json`` + ``model.onnx``.

Written into a temporary sibling directory and renamed into place, so a
failed compile leaves nothing behind and never clobbers a good artifact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgec.errors import ArtifactError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
KERNEL_CONSTANTS = "kernel_constants.npz"  # integer constants kernels read, for edgec profile (sparse indices)


@dataclasses.dataclass
class Artifact:
    """A compiled model on disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def lib(self) -> Path:
        return self.path / "lib.so"

    @property
    def onnx(self) -> Path:
        return self.path / "model.onnx"

    @property
    def target_name(self) -> str:
        return self.manifest["target"]["preset"]

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.manifest["outputs"]


def load_artifact(path: str | Path) -> Artifact:
    """Open an artifact directory written by ``edgec compile``."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact '{path}' does not exist; create it with: edgec compile MODEL -o {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"'{path}' is not an edgec artifact: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(f"'{manifest_path}' is not valid JSON ({error}); recompile the model") from None
    artifact = Artifact(path, manifest)
    for name in manifest.get("files", []):
        if not (path / name).is_file():
            raise ArtifactError(f"artifact '{path}' is incomplete: {name} is missing; recompile the model")
    return artifact


@contextlib.contextmanager
def staging(output: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``output`` atomically.

    Refuses to replace an existing path that is not an edgec artifact.
    """
    output = Path(output).absolute()
    if output.exists() and not (output / MANIFEST).is_file():
        if output.is_file() or any(output.iterdir()):
            raise ArtifactError(
                f"'{output}' exists and is not an edgec artifact; refusing to overwrite it. "
                "Choose another -o or remove it"
            )
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield temp
        os.chmod(temp, 0o755)
        _replace(temp, output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _replace(temp: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.rmdir(old)
        os.rename(output, old)
    try:
        os.rename(temp, output)
    except OSError:
        if old is not None:
            os.rename(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
