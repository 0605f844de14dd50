"""Calibration for int8 quantization: the user's samples, and the activation ranges the float graph computes on them.

Samples (``calibration=``):

- a folder of ``.npy`` files (sorted by name), one array each;
- one ``.npy`` file whose first axis is the batch: it is split into the
  model's batch size;
- in Python, any iterable of arrays (or, for a model with several inputs, of
  sequences of arrays, one per graph input).

An array with one axis fewer than the model's input gets a batch axis; one
with a larger batch than the model's static batch is split into the model's
batch. Its dtype becomes the input's.

Activations: ONNX Runtime runs a copy of the float graph (graph
optimisations off, so every named tensor exists) with the tensors to
quantize as extra outputs; one pass over the samples for ``minmax``, two for
``percentile`` and ``entropy`` (the first finds each tensor's ``max|x|``, the
bound of its histogram). ONNX Runtime is used as a library here (through
edgec/core/ort.py), not as the verification oracle of runtimes/.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec.core.model import STANDARD_DOMAINS, has_custom_ops
from edgec.core.ort import onnxruntime_session
from edgec.passes.int8_math import ActivationQuant, Histogram, activation_quant, entropy_range, percentile_range

# the graph's in-memory metadata (``ir.Model.meta``) where quantize-int8 leaves the ranges it used
RANGES_META = "edgec.int8_ranges"


class CalibratedRanges(dict):
    """Activation parameters by tensor name from an earlier calibration (``RANGES_META``), given as
    ``calibration=``: the pass uses them as they are. The standard twin of a block-sparse graph
    is quantized with its graph's own ranges (edgec/apply_passes.py), so reference.onnx is the
    same quantized model as the build, whatever the method."""

logger = logging.getLogger(__name__)

__all__ = ["NO_CALIBRATION", "RANGES_META", "CalibratedRanges", "activation_ranges", "calibration_samples"]

NO_CALIBRATION = (
    "int8 quantization needs calibration data to measure activation ranges: give calibration=DIR (a folder of "
    ".npy files, one input sample each), calibration=FILE.npy (one array with a batch axis), or in Python "
    "QuantizeInt8Pass(calibration=<iterable of arrays>); a few hundred representative inputs (the preprocessing "
    "of deployment), at least one"
)


def _dtype(value: ir.Value) -> np.dtype:
    return value.type.dtype.numpy() if value.type is not None else np.dtype(np.float32)


def _shape(value: ir.Value) -> tuple[int | None, ...] | None:
    if value.shape is None:
        return None
    return tuple(dim if isinstance(dim, int) else None for dim in value.shape)


def _fit(array: Any, value: ir.Value, where: str) -> list[np.ndarray]:
    """One calibration array for graph input ``value`` as a list of feeds of the input's shape."""
    array = np.asarray(array)
    shape = _shape(value)
    name = value.name
    if shape is None:
        return [array.astype(_dtype(value), copy=False)]
    if array.ndim == len(shape) - 1:
        array = array[None]
    if array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape[1:], shape[1:])):
        wanted = "x".join("?" if dim is None else str(dim) for dim in shape)
        raise ValueError(f"{where}: shape {array.shape} does not fit input {name!r} of shape {wanted} (batch axis optional)")
    batch = shape[0]
    if batch is None or array.shape[0] == batch:
        return [array.astype(_dtype(value), copy=False)]
    if array.shape[0] % batch:
        raise ValueError(f"{where}: batch of {array.shape[0]} is not a multiple of input {name!r}'s batch {batch}")
    return [chunk.astype(_dtype(value), copy=False) for chunk in np.split(array, array.shape[0] // batch)]


def calibration_samples(source: str | Path | Iterable[Any] | None, inputs: Sequence[ir.Value]) -> list[list[np.ndarray]]:
    """The feeds (one list of arrays per run, in graph-input order) that ``source`` describes, or
    ValueError saying what is wrong with it (see the module docstring)."""
    if source is None:
        raise ValueError(NO_CALIBRATION)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise ValueError(f"calibration folder {str(path)!r} holds no .npy files; {NO_CALIBRATION}")
            items: Iterable[Any] = ((np.load(file), str(file)) for file in files)
        elif path.is_file() and path.suffix == ".npy":
            items = [(np.load(path), str(path))]
        else:
            raise ValueError(f"calibration={str(source)!r} is neither a folder nor a .npy file; {NO_CALIBRATION}")
        if len(inputs) != 1:
            raise ValueError(
                f"the model has {len(inputs)} inputs; .npy calibration data feeds one: pass an iterable of "
                "tuples (one array per input) in Python"
            )
    elif isinstance(source, np.ndarray):
        items = [(source, "calibration array")]
    else:
        items = ((item, f"calibration item {index}") for index, item in enumerate(source))
    feeds: list[list[np.ndarray]] = []
    for item, where in items:
        arrays = [item] if len(inputs) == 1 and not isinstance(item, (tuple, list)) else list(item)
        if len(arrays) != len(inputs):
            raise ValueError(f"{where}: {len(arrays)} arrays for a model with {len(inputs)} inputs")
        per_input = [_fit(array, value, where) for array, value in zip(arrays, inputs)]
        if len({len(chunks) for chunks in per_input}) != 1:
            raise ValueError(f"{where}: the inputs' arrays hold different numbers of samples")
        feeds.extend(list(run) for run in zip(*per_input))
    if not feeds:
        raise ValueError(f"the calibration data holds no sample; {NO_CALIBRATION}")
    return feeds


def _activations(model: ir.Model, names: Sequence[str], feeds: list[list[np.ndarray]]) -> Iterable[dict[str, np.ndarray]]:
    """For each feed, the named tensors of the float graph (ONNX Runtime, no graph optimisations;
    onnx's reference evaluator with the ops' NumPy references where the graph holds edgec ops)."""
    if has_custom_ops(model):
        yield from _activations_with_edgec_ops(model, names, feeds)
        return
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    inputs = [value.name for value in copy.graph.inputs]
    values = {value.name: value for node in copy.graph for value in node.outputs if value.name}
    existing = {value.name for value in copy.graph.outputs}
    computed = [name for name in names if name not in inputs]
    for name in computed:
        if name not in existing:
            value = values[name]
            if value.type is None:
                value.type = ir.TensorType(ir.DataType.FLOAT)
            copy.graph.outputs.append(value)
    session = onnxruntime_session(copy, optimize=False)
    outputs = [output.name for output in session.get_outputs()]
    for feed in feeds:
        results = dict(zip(outputs, session.run(None, dict(zip(inputs, feed, strict=True))), strict=True))
        results.update(zip(inputs, feed, strict=True))
        yield {name: results[name] for name in names}


def _activations_with_edgec_ops(
    model: ir.Model, names: Sequence[str], feeds: list[list[np.ndarray]]
) -> Iterable[dict[str, np.ndarray]]:
    """``_activations`` of a graph with block-sparse (or other edgec) layers, which ONNX Runtime
    cannot run: every tensor the evaluator computes is kept, the named ones are returned."""
    from edgec.ops.evaluator import numpy_evaluator

    evaluator = numpy_evaluator(model)
    if evaluator is None:
        ops = sorted({f"{node.domain}:{node.op_type}" for node in model.graph if node.domain not in STANDARD_DOMAINS})
        raise ir.passes.PreconditionError(f"no NumPy reference runs {', '.join(ops)}: cannot calibrate this graph")
    inputs = [value.name for value in model.graph.inputs]
    for feed in feeds:
        outputs = evaluator.run(list(names), dict(zip(inputs, feed, strict=True)))
        yield {name: np.asarray(array) for name, array in zip(names, outputs, strict=True)}


def activation_ranges(
    model: ir.Model, names: Sequence[str], feeds: list[list[np.ndarray]], method: str, percentile: float
) -> dict[str, ActivationQuant]:
    """uint8 parameters of each named tensor, calibrated on ``feeds`` by ``method``."""
    low = {name: np.inf for name in names}
    high = {name: -np.inf for name in names}
    for tensors in _activations(model, names, feeds):
        for name, array in tensors.items():
            if array.size:
                low[name], high[name] = min(low[name], float(array.min())), max(high[name], float(array.max()))
    if method == "minmax":
        return {name: activation_quant(low[name], high[name]) for name in names}
    histograms = {name: Histogram(max(abs(low[name]), abs(high[name]))) for name in names}
    for tensors in _activations(model, names, feeds):
        for name, array in tensors.items():
            histograms[name].add(array)
    chosen = {}
    for name, histogram in histograms.items():
        lo, hi = percentile_range(histogram, percentile) if method == "percentile" else entropy_range(histogram)
        chosen[name] = activation_quant(lo, hi)
        logger.debug("%s: min/max [%.4g, %.4g] -> %s [%.4g, %.4g]", name, low[name], high[name], method, lo, hi)
    return chosen
