"""The artifact directory: ``lib.so`` + ``manifest.json`` + ``model.onnx``.

Written into a temporary sibling directory and renamed into place, so a
failed compile leaves nothing behind and never clobbers a good artifact.

An artifact is recognised by its manifest, not by the file name: a JSON
object with ``"generator": "edgec"`` (format 2; format 1, written before the
marker existed, is known by its ``edgec_version`` key). A compile replaces an
existing directory only when it is such an artifact holding nothing but the
files its manifest lists. Loading checks the manifest's keys, that every
listed file is there with the sha256 recorded at compile time (format 2),
and that ``lib.so`` is a complete ELF shared object for the target's CPU,
before anything dlopens it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgec.core.elf import ElfProblem, check_shared_object
from edgec.core.errors import ArtifactError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2
GENERATOR = "edgec"
KERNEL_CONSTANTS = "kernel_constants.npz"  # integer constants kernels read, for edgec profile (sparse indices)
MODEL_ONNX = "model.onnx"  # the graph the artifact was built from
REFERENCE_ONNX = "reference.onnx"  # the standard-ONNX equivalent of a graph with edgec ops (ONNX Runtime runs it)

# key path -> type(s) every manifest this edgec reads must have
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "target": dict,
    "target.preset": str,
    "target.spec": str,
    "target.arch": str,
    "target.cpu_arch": str,
    "target.host_runnable": bool,
    "target.tvm": dict,
    "inputs": list,
    "outputs": list,
    "files": list,
}
_SIGNATURE = {"name": str, "shape": list, "dtype": str}


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
        return self.path / MODEL_ONNX

    @property
    def reference_onnx(self) -> Path | None:
        """The standard-ONNX equivalent of model.onnx, when that holds edgec ops."""
        return self.path / REFERENCE_ONNX if REFERENCE_ONNX in self.manifest.get("files", ()) else None

    @property
    def target_name(self) -> str:
        return self.manifest["target"]["preset"]

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.manifest["outputs"]


def is_edgec_manifest(manifest: Any) -> bool:
    """Whether ``manifest`` (parsed JSON) was written by edgec: the generator marker, or format 1."""
    if not isinstance(manifest, dict):
        return False
    return manifest.get("generator") == GENERATOR or (manifest.get("format") == 1 and "edgec_version" in manifest)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_artifact(path: str | Path) -> Artifact:
    """Open an artifact directory written by ``edgec compile``; ArtifactError says what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact '{path}' does not exist; create it with: edgec compile MODEL -o {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"'{path}' is not an edgec artifact: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"'{manifest_path}' is not valid JSON ({error}); recompile the model") from None
    if not is_edgec_manifest(manifest):
        raise ArtifactError(
            f"'{path}' is not an edgec artifact: '{manifest_path}' was not written by edgec "
            f'(a JSON object with "generator": "edgec" is expected); recompile the model'
        )
    check_manifest(manifest_path, manifest)
    artifact = Artifact(path, manifest)
    for name in manifest["files"]:
        if not (path / name).is_file():
            raise ArtifactError(f"artifact '{path}' is incomplete: {name} is missing; recompile the model")
    recorded = manifest.get("sha256", {})
    for name in manifest["files"]:
        if name in recorded and file_sha256(path / name) != recorded[name]:
            raise ArtifactError(
                f"'{path / name}' is not the file edgec compiled into this artifact (its sha256 differs from the "
                f"one in {MANIFEST}): it was replaced or damaged; recompile the model"
            )
    if not recorded:
        log.info("'%s' is a format-%s artifact without file hashes: its files are not checked", path, manifest["format"])
    try:
        check_shared_object(artifact.lib, manifest["target"]["cpu_arch"])
    except ElfProblem as problem:
        raise ArtifactError(f"'{artifact.lib}' cannot be loaded: {problem}; recompile the model") from None
    return artifact


def check_manifest(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """ArtifactError naming the first key a readable manifest lacks or has of the wrong type."""
    version = manifest.get("format")
    if not isinstance(version, int) or not 1 <= version <= MANIFEST_FORMAT:
        raise ArtifactError(
            f"'{manifest_path}' has manifest format {version!r}; this edgec reads formats 1 to {MANIFEST_FORMAT}: "
            "recompile the model with this edgec"
        )
    for key, kind in _REQUIRED.items():
        _require(manifest_path, manifest, key, kind)
    for listing in ("inputs", "outputs"):
        for index, entry in enumerate(manifest[listing]):
            if not isinstance(entry, dict):
                _bad(manifest_path, f"{listing}[{index}]", dict, entry)
            for key, kind in _SIGNATURE.items():
                _require(manifest_path, entry, key, kind, prefix=f"{listing}[{index}].")
            if not all(isinstance(dim, int) and dim >= 0 for dim in entry["shape"]):
                _bad(manifest_path, f"{listing}[{index}].shape", "a list of sizes", entry["shape"])
    files = manifest["files"]
    if not all(isinstance(name, str) and name and Path(name).name == name for name in files) or "lib.so" not in files:
        _bad(manifest_path, "files", "a list of file names including lib.so", files)
    if version >= 2:
        _require(manifest_path, manifest, "sha256", dict)
        unhashed = [name for name in files if not isinstance(manifest["sha256"].get(name), str)]
        if unhashed:
            _bad(manifest_path, f"sha256.{unhashed[0]}", str, manifest["sha256"].get(unhashed[0]))


def _require(manifest_path: Path, data: dict, key: str, kind, prefix: str = "") -> None:
    value: Any = data
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ArtifactError(
                f"'{manifest_path}' lacks the key '{prefix}{key}': it was edited or written by another program; "
                "recompile the model"
            )
        value = value[part]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        _bad(manifest_path, prefix + key, kind, value)


def _bad(manifest_path: Path, key: str, kind, value: Any) -> None:
    wanted = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    shown = json.dumps(value)[:60]
    raise ArtifactError(f"'{manifest_path}': '{key}' should be {wanted}, not {shown}; recompile the model")


def check_replaceable(output: Path, retries: int = 20) -> None:
    """ArtifactError unless ``output`` is absent, an empty directory, or an edgec artifact
    holding only the files its manifest lists (so replacing it loses nothing edgec did not write).
    The listing and the manifest are read from one open directory, so that another compile
    renaming its artifact into place meanwhile cannot mix two directories."""
    if output.is_symlink():
        raise ArtifactError(f"'{output}' is a symbolic link; refusing to replace it. Give the real directory as -o")
    try:
        directory = os.open(output, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        if output.is_file():
            raise ArtifactError(
                f"'{output}' exists and is a file, not an edgec artifact; refusing to overwrite it. "
                "Choose another -o or remove it"
            ) from None
        blocking = next((parent for parent in output.parents if parent.is_file()), output.parent)
        raise ArtifactError(f"cannot create '{output}': '{blocking}' is a file, not a directory; choose another -o") from None
    except OSError as error:
        raise ArtifactError(f"cannot read '{output}': {error.strerror}; choose another -o") from None
    try:
        entries = set(os.listdir(directory))
        manifest = _read_manifest_at(directory) if MANIFEST in entries else None
        moved = not _same_inode(directory, output)
    finally:
        os.close(directory)
    if moved:  # another compile moved it aside (and may be deleting it) while it was read: look again
        if retries:
            return check_replaceable(output, retries - 1)
        raise ArtifactError(f"'{output}' kept changing while this compile looked at it; retry")
    if not entries:
        return
    refuse = f"'{output}' exists and is not an edgec artifact; refusing to overwrite it. Choose another -o or remove it"
    if MANIFEST not in entries:
        raise ArtifactError(f"{refuse} (it has no {MANIFEST})")
    if not is_edgec_manifest(manifest):
        raise ArtifactError(f"{refuse} (its {MANIFEST} was not written by edgec)")
    listed = {name for name in manifest.get("files", []) if isinstance(name, str)} | {MANIFEST}
    foreign = sorted(entries - listed)
    if foreign:
        raise ArtifactError(
            f"'{output}' is an edgec artifact but also holds {', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}, which edgec did not write; refusing to delete them. "
            "Move them out or choose another -o"
        )


def _same_inode(directory: int, path: Path) -> bool:
    try:
        here, there = os.fstat(directory), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_manifest_at(directory: int) -> Any:
    """The parsed manifest.json inside the open directory ``directory``; None if unreadable."""
    try:
        with open(os.open(MANIFEST, os.O_RDONLY, dir_fd=directory), "rb") as stream:
            return json.loads(stream.read())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def staging(output: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``output`` atomically.

    Refuses to replace an existing path that is not an edgec artifact (see
    check_replaceable); any failure, Ctrl-C or SIGTERM removes the temporary
    directory. Two compiles racing on one output both succeed; the last one
    to finish is the artifact left.
    """
    output = Path(output).absolute()
    check_replaceable(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    except OSError as error:
        raise ArtifactError(
            f"cannot create the artifact directory '{output}': {error.strerror or error} "
            f"({error.filename or output.parent}); choose another -o"
        ) from None
    try:
        yield temp
        os.chmod(temp, 0o755)
        _replace(temp, output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


_RACES = 20  # attempts at moving the finished directory into place while other compiles write the same output


def _replace(temp: Path, output: Path) -> None:
    """Rename ``temp`` to ``output``, moving an existing artifact aside first (and deleting it after)."""
    for _ in range(_RACES):
        try:
            os.rename(temp, output)  # also replaces an empty directory
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise ArtifactError(f"cannot move the artifact into '{output}': {error.strerror}") from None
        check_replaceable(output)  # it may have changed since the compile started
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.rmdir(old)
        try:
            os.rename(output, old)
        except FileNotFoundError:
            continue  # another compile moved it away first: try again
        try:
            os.rename(temp, output)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                with contextlib.suppress(OSError):
                    os.rename(old, output)
                raise ArtifactError(f"cannot move the artifact into '{output}': {error.strerror}") from None
            shutil.rmtree(old, ignore_errors=True)  # another compile's artifact took the place: retry over it
            continue
        shutil.rmtree(old, ignore_errors=True)
        return
    raise ArtifactError(f"'{output}' kept changing while this compile tried to replace it; retry")


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
