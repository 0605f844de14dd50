"""Read model inputs from .npy/.npz files and write outputs back."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgec.core.artifact import Artifact
from edgec.core.errors import InputDataError, OutputError


def _load_array(path: Path):
    if not path.is_file():
        raise InputDataError(f"input file '{path}' does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise InputDataError(f"'{path}' is not a NumPy .npy/.npz file: {error}") from None


def read_inputs(artifact: Artifact, paths: Sequence[Path]) -> list[np.ndarray]:
    """One .npy per input in order, or a single .npz keyed by input name."""
    specs = artifact.inputs
    if len(paths) == 1 and paths[0].suffix == ".npz":
        archive = _load_array(paths[0])
        missing = [spec["name"] for spec in specs if spec["name"] not in archive.files]
        if missing:
            raise InputDataError(
                f"'{paths[0]}' lacks the input(s) {', '.join(missing)} (it has: {', '.join(archive.files)})"
            )
        arrays = [archive[spec["name"]] for spec in specs]
    else:
        if len(paths) != len(specs):
            raise InputDataError(
                f"the model takes {len(specs)} input(s) ({', '.join(s['name'] for s in specs)}); got {len(paths)} file(s)"
            )
        arrays = [_load_array(path) for path in paths]
    converted = []
    for array, spec in zip(arrays, specs, strict=True):
        if list(array.shape) != list(spec["shape"]):
            raise InputDataError(f"input {spec['name']!r} needs shape {tuple(spec['shape'])}; the file holds {array.shape}")
        if array.dtype != np.dtype(spec["dtype"]):
            if not np.can_cast(array.dtype, spec["dtype"], casting="same_kind"):
                raise InputDataError(f"input {spec['name']!r} needs dtype {spec['dtype']}; the file holds {array.dtype}")
            array = array.astype(spec["dtype"])
        converted.append(np.ascontiguousarray(array))
    return converted


def write_outputs(artifact: Artifact, outputs: Sequence[np.ndarray], path: Path) -> None:
    """Write ``outputs`` to exactly ``path``: .npy (one output) or .npz (by output name).

    NumPy appends .npy to any other name, so that writing ``out`` would make ``out.npy``
    while the user looks for ``out``: other names are refused instead.
    """
    if path.is_dir():
        raise OutputError(f"-o '{path}' is a directory; give a file name ending in .npy (one output) or .npz")
    if path.suffix not in (".npy", ".npz"):
        raise OutputError(f"-o '{path}': give a file name ending in .npy (one output) or .npz (by output name)")
    if path.suffix == ".npy" and len(outputs) != 1:
        raise OutputError(f"the model has {len(outputs)} outputs: write them to an .npz file, not '{path}'")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":
            names = [spec["name"] for spec in artifact.outputs]
            np.savez(path, **dict(zip(names, outputs, strict=True)))
        else:
            np.save(path, outputs[0])
    except OSError as error:
        raise OutputError(f"cannot write '{path}': {error.strerror or error}") from None
