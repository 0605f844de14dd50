"""Load a model file and hold it as ONNX IR.

Formats, sniffed from the bytes (not the extension):

- TorchScript archive (``torch.jit.save``): zip with ``code/`` entries;
  exported with the TorchScript ONNX exporter; needs ``input_shape``.
- torch.export archive (``torch.export.save``, ``.pt2``): zip with
  ``models/``/``archive_format`` entries; shapes come from the archive.
- ONNX protobuf: shapes from the graph; symbolic dims need ``input_shape``.
- Pickled ``nn.Module`` (``torch.save(model)``): unpickling runs arbitrary
  code, so only with ``trust_pickle=True``; needs ``input_shape``.
- A bare ``state_dict`` holds no architecture: refused with what to give.

After loading, every format gets the same clean-ups (edgec/core/fold.py):
function inlining, constant folding (constant subgraphs such as
ConstantOfShape become initializers), unused-node removal, constants lifted
to initializers, ONNX shape inference. Batch norms are *not* fused here; that is the
``fold-bn`` pass's job, so that its effect is reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec.core import shapes as shape_args
from edgec.core.errors import InputShapeError, LoadError
from edgec.core.model import Model

log = logging.getLogger(__name__)

ONNX_OPSET = 17
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def load(
    path: str | Path,
    input_shape: Any = None,
    *,
    trust_pickle: bool = False,
) -> Model:
    """Load ``path`` (TorchScript, .pt2, ONNX, or a trusted pickle) as an edgec Model.

    ``input_shape`` is ``(1, 3, 224, 224)``, ``"1,3,224,224"``, a list of
    such (one per input) or ``{"input_name": shape}``.
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(f"model file '{path}' does not exist")
    if not path.is_file():
        raise LoadError(f"'{path}' is a directory, not a model file")
    data = path.read_bytes()
    if not data:
        raise LoadError(f"model file '{path}' is empty")
    sha256 = hashlib.sha256(data).hexdigest()
    shapes = shape_args.normalize(input_shape)
    kind = sniff_format(path, data)
    log.info("loading %s as %s", path, kind)
    if kind in ("torchscript", "pickle"):
        del data  # torch reads the file itself: no second copy of a large model alive during the export
    if kind == "onnx":
        graph = _load_onnx(path, data, shapes)
        reference = None
    elif kind == "torchscript":
        module = _load_torchscript(path)
        graph, reference = _export_torch(path, module, _require_shapes(path, "TorchScript archive", shapes), kind)
    elif kind == "torch.export":
        graph, reference = _load_exported_program(path, data, shapes, trust_pickle)
    elif kind == "pickle":
        module = _load_pickle(path, trust_pickle)
        graph, reference = _export_torch(path, module, _require_shapes(path, "pickled nn.Module", shapes), kind)
    else:  # pragma: no cover - sniff_format returns only the kinds above
        raise LoadError(f"'{path}': unknown format {kind}")
    cleanup(graph)
    check_static_inputs(path, graph)
    _check_graph_memory(path, graph)
    return Model(graph=graph, source=path, source_format=kind, source_sha256=sha256, torch_reference=reference)


def from_onnx_ir(graph: ir.Model, name: str = "<in-memory>") -> Model:
    """Wrap an ``onnx_ir.Model`` built in Python (after the same clean-ups)."""
    cleanup(graph)
    check_static_inputs(Path(name), graph)
    return Model(graph=graph, source=None, source_format="onnx-ir", source_sha256=None)


def sniff_format(path: Path, data: bytes) -> str:
    """Tell the format from the file's bytes; LoadError for truncated or unknown files."""
    if data[:2] == b"PK":
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile:
            raise LoadError(
                f"'{path}' looks like a PyTorch archive (zip) but is corrupt or truncated; "
                "save it again (torch.jit.save, torch.export.save or torch.save) and retry"
            ) from None
        if any("/code/" in name or name.endswith("constants.pkl") for name in names):
            return "torchscript"
        if any(name.endswith(("archive_format", "models/model.json")) for name in names):
            return "torch.export"
        if any(name.endswith("data.pkl") for name in names):
            return "pickle"
        raise LoadError(f"'{path}' is a zip archive but not a PyTorch model (entries: {', '.join(names[:5])})")
    if data[:2] in _PICKLE_MAGIC:
        return "pickle"
    return "onnx"


def _require_shapes(path: Path, what: str, shapes: shape_args.InputShapes) -> shape_args.InputShapes:
    if not shapes:
        raise InputShapeError(
            f"'{path}' is a {what}, which does not record its input shape; "
            "give one with --input-shape 1,3,224,224 (input_shape=(1, 3, 224, 224) in Python)"
        )
    return shapes


def _load_onnx(path: Path, data: bytes, shapes: shape_args.InputShapes) -> ir.Model:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise LoadError(
            f"'{path}' is neither a PyTorch archive nor a readable ONNX file ({error.__class__.__name__}); "
            "the file may be corrupt or truncated"
        ) from None
    if not proto.graph.node:
        raise LoadError(f"'{path}' parsed as ONNX but holds no graph nodes; it is corrupt or not an ONNX model")
    _load_external_data(path, proto)
    graph = ir.serde.deserialize_model(proto)
    _drop_initializer_inputs(graph)
    _apply_shapes(path, graph, shapes)
    _check_graph_memory(path, graph)  # before the clean-ups fold constants at this size
    return graph


def _load_external_data(path: Path, proto) -> None:
    """Weights kept in external data files (``onnx.save(..., save_as_external_data=True)``,
    exporters of large models) are read from the ONNX file's directory, where their
    ``location`` is relative to, into the model: the artifact's model.onnx is then whole."""
    from onnx import external_data_helper as external

    names = sorted({
        entry.value
        for tensor in proto.graph.initializer if external.uses_external_data(tensor)
        for entry in tensor.external_data if entry.key == "location"
    })  # fmt: skip
    try:
        external.load_external_data_for_model(proto, str(path.parent))  # initializers and constant attributes
    except Exception as error:  # noqa: BLE001 - missing file, short file or a location outside the directory
        raise LoadError(
            f"'{path}' keeps its weights in external data ({', '.join(names) or 'files'}), which could not be read from "
            f"'{path.parent}': {_first_line(error).rstrip('.')}. Keep the data file(s) next to the .onnx file, as they were saved"
        ) from None
    if names:
        log.info("read the weights of %s from external data: %s", path.name, ", ".join(names))


def _drop_initializer_inputs(graph: ir.Model) -> None:
    """Old ONNX files (IR < 4) list every weight as a graph input too; a deployed model
    takes only its real inputs, so inputs backed by an initializer become constants."""
    inputs = graph.graph.inputs
    for value in [value for value in inputs if value.name in graph.graph.initializers]:
        inputs.remove(value)


def _apply_shapes(path: Path, graph: ir.Model, shapes: shape_args.InputShapes) -> None:
    inputs = graph.graph.inputs
    known = {value.name for value in inputs} | set(range(len(inputs)))
    unknown = [key for key in shapes if key not in known]
    if unknown:
        raise InputShapeError(
            f"--input-shape names {unknown[0]!r}, but '{path}' has the inputs: "
            f"{', '.join(value.name for value in inputs)}"
        )
    for position, value in enumerate(inputs):
        shape = shape_args.lookup(shapes, position, value.name)
        if shape is None:
            continue
        if value.shape is not None and len(value.shape) != len(shape):
            raise InputShapeError(
                f"input {value.name!r} of '{path}' has rank {len(value.shape)} "
                f"({_dims(value.shape)}), but --input-shape gives {len(shape)} dims {shape}"
            )
        if value.shape is not None:
            for dim, given in zip(value.shape, shape, strict=True):
                if isinstance(dim, int) and dim != given:
                    raise InputShapeError(
                        f"input {value.name!r} of '{path}' has the fixed shape {_dims(value.shape)}; "
                        f"--input-shape {shape} contradicts it"
                    )
        value.shape = ir.Shape(shape)


def _dims(shape: ir.Shape) -> str:
    return "x".join(str(dim) if isinstance(dim, int) else (str(dim) or "?") for dim in shape)


def check_static_inputs(path: Path, graph: ir.Model) -> None:
    """Every graph input needs a static shape to compile; say which dim is missing."""
    for value in graph.graph.inputs:
        if value.shape is None or any(not isinstance(dim, int) for dim in value.shape):
            dims = _dims(value.shape) if value.shape is not None else "unknown"
            raise InputShapeError(
                f"input {value.name!r} of '{path}' has a dynamic shape ({dims}); "
                f"give a static one with --input-shape {value.name}:1,3,224,224"
            )


def _static(value: ir.Value) -> bool:
    return value.shape is not None and all(isinstance(dim, int) for dim in value.shape)


def _load_torchscript(path: Path):
    import torch

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError and friends
        raise LoadError(f"'{path}' is a TorchScript archive that torch.jit.load cannot read: {_last_line(error)}") from None
    return module.eval()


def _load_pickle(path: Path, trust_pickle: bool):
    import pickle

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise LoadError(
                f"'{path}' is a pickled PyTorch object (torch.save of a module); unpickling it runs arbitrary code. "
                "If you trust the file, pass --trust-pickle (trust_pickle=True); better, save the model as "
                "TorchScript (torch.jit.save(torch.jit.script(model), 'model.pt')) or as a torch.export "
                "archive (torch.export.save(torch.export.export(model, (x,)), 'model.pt2'))"
            ) from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - any unpickling failure
            raise LoadError(f"'{path}': torch.load failed: {_last_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - truncated or corrupt archives
        raise LoadError(f"'{path}' could not be read by torch.load (corrupt or truncated?): {_last_line(error)}") from None
    if isinstance(obj, dict):
        tensors = [key for key, value in obj.items() if isinstance(value, torch.Tensor)]
        example = f", e.g. {tensors[0]!r}" if tensors else ""
        raise LoadError(
            f"'{path}' is a state_dict (a dict of {len(obj)} entries{example}): it holds weights but not the "
            "architecture. Load it into your nn.Module and save that as TorchScript "
            "(torch.jit.save(torch.jit.script(model), 'model.pt')) or torch.export "
            "(torch.export.save(torch.export.export(model, (x,)), 'model.pt2'))"
        )
    if not isinstance(obj, torch.nn.Module):
        raise LoadError(f"'{path}' holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj.eval()


# torch.export archive parts that torch unpickles with the full pickle module (code runs), whatever
# weights_only says: opaque objects (pickle.loads) and script objects (torch._C._pickle_load_obj)
_UNSAFE_PT2_PARTS = ("/constants/opaque_obj", "/constants/custom_obj")


@contextlib.contextmanager
def _weights_only_unpickling() -> Iterator[None]:
    """Every torch.load inside runs with weights_only=True (only tensors and plain containers,
    no code), whatever its caller asked: torch.export.load retries a failed safe load with
    weights_only=False, which would run code from the file. torch reads the
    TORCH_FORCE_WEIGHTS_ONLY_LOAD switch on each call."""
    saved = {name: os.environ.pop(name, None) for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _load_exported_program(
    path: Path, data: bytes, shapes: shape_args.InputShapes, trust_pickle: bool
) -> tuple[ir.Model, Callable]:
    """torch.export.load of ``data`` (the bytes already read: nothing can swap the file meanwhile),
    with every pickled part loaded weights-only unless ``trust_pickle``."""
    import pickle

    import torch

    refuse = (
        "edgec does not run code from a model file: pass --trust-pickle (trust_pickle=True) only if you trust "
        "where this file came from"
    )
    unsafe = [name for name in zipfile.ZipFile(io.BytesIO(data)).namelist() if any(part in name for part in _UNSAFE_PT2_PARTS)]
    if unsafe and not trust_pickle:
        raise LoadError(f"'{path}' is a torch.export archive with pickled Python objects ({unsafe[0]}), which run code when loaded; {refuse}")
    guard = contextlib.nullcontext() if trust_pickle else _weights_only_unpickling()
    try:
        with guard, warnings.catch_warnings(), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(data))
    except pickle.UnpicklingError as error:
        if trust_pickle:
            raise LoadError(f"'{path}': torch.export.load failed: {_last_line(error)}") from None
        blocked = _blocked_global(error)
        raise LoadError(
            f"'{path}' is a torch.export archive holding a pickle that is not plain tensors"
            f"{f' (it calls {blocked})' if blocked else ''}: loading it would run code from the file; {refuse}"
        ) from None
    except Exception as error:  # noqa: BLE001
        raise LoadError(f"'{path}' is a torch.export archive that torch.export.load cannot read: {_last_line(error)}") from None
    args, _ = program.example_inputs or ((), {})
    if not all(isinstance(arg, torch.Tensor) for arg in args):
        kinds = ", ".join(sorted({type(arg).__name__ for arg in args if not isinstance(arg, torch.Tensor)}))
        raise LoadError(f"'{path}': the archive's sample inputs hold {kinds}, not tensors; re-export it with tensor inputs")
    if not args:
        placeholders = [
            node for node in program.graph.nodes if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
        ]
        args = tuple(torch.zeros(tuple(node.meta["val"].shape)) for node in placeholders)
    recorded = [tuple(arg.shape) for arg in args]
    for position, shape in enumerate(recorded):
        given = shape_args.lookup(shapes, position, program.graph_signature.user_inputs[position])
        if given is not None and tuple(given) != shape:
            raise InputShapeError(
                f"'{path}' was exported for input shape {shape}; --input-shape {given} differs. "
                "Re-export the program with the shape you want (torch.export.export(model, (x,)))"
            )
    graph = _run_exporter(path, program, args, dynamo=True)
    module = program.module()
    return graph, _torch_runner(module)


def _export_torch(path: Path, module, shapes: shape_args.InputShapes, kind: str) -> tuple[ir.Model, Callable]:
    import torch

    chosen = []
    for position in range(len(shapes)):
        shape = shapes.get(position)
        if shape is None:
            shape = next(iter(shapes.values())) if len(shapes) == 1 else None
        if shape is None:
            raise InputShapeError(f"give one --input-shape per input, in order, for '{path}'")
        chosen.append(shape)
    check_memory(path, {f"input {position}": (shape, 4) for position, shape in enumerate(chosen)})  # torch.randn: float32
    args = tuple(torch.randn(shape) for shape in chosen)
    try:  # PyTorch's own error for a wrong shape beats the exporter's
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module(*args)
    except Exception as error:  # noqa: BLE001 - shape errors come as RuntimeError, ValueError, ...
        given = " and ".join(",".join(map(str, shape)) for shape in chosen)
        raise InputShapeError(
            f"'{path}' does not run on a random input of shape {given}: {_last_line(error)}; "
            "give the shape the model expects with --input-shape"
        ) from None
    graph = _run_exporter(path, module, args, dynamo=kind != "torchscript")
    return graph, _torch_runner(module)


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(path: Path, tensors: dict[str, tuple[tuple[int, ...], int]]) -> None:
    """InputShapeError when the inputs plus the largest other tensor cannot fit in this machine's
    memory (edgec runs the model here to export and verify it: at least that much is alive at
    once). ``tensors``: ``"input 'x'"`` / ``"tensor 'y'"`` -> (shape, bytes per element)."""
    sizes = {name: math.prod(shape) * itemsize for name, (shape, itemsize) in tensors.items()}
    if not sizes:
        return
    inputs = sum(size for name, size in sizes.items() if name.startswith("input"))
    others = {name: size for name, size in sizes.items() if not name.startswith("input")}
    largest = max(others or sizes, key=sizes.get)
    needed = inputs + others.get(largest, 0)
    available = memory_bytes()
    if needed > available:
        shape = "x".join(map(str, tensors[largest][0]))
        raise InputShapeError(
            f"'{path}' at this input shape needs at least {_gib(needed)} for its tensors ({largest} alone, {shape}, "
            f"is {_gib(sizes[largest])}), more than this machine's {_gib(available)} of memory; give a smaller --input-shape"
        )


def _gib(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB"


def _check_graph_memory(path: Path, graph: ir.Model) -> None:
    """check_memory over the graph's inputs and every value with a static shape (after shape inference)."""
    tensors: dict[str, tuple[tuple[int, ...], int]] = {}
    for kind, values in (("input", graph.graph.inputs), ("tensor", (out for node in graph.graph for out in node.outputs))):
        for value in values:
            if _static(value):
                itemsize = value.dtype.itemsize if value.dtype is not None else 4
                tensors[f"{kind} {value.name!r}"] = (tuple(value.shape), itemsize)
    check_memory(path, tensors)


def _run_exporter(path: Path, model, args: tuple, *, dynamo: bool) -> ir.Model:
    """torch.onnx.export to ONNX IR in memory; its chatter (Python and C++ alike) goes to the log, not the terminal."""
    import torch

    output: list[str] = []
    try:
        with warnings.catch_warnings(), captured_output(output):
            warnings.simplefilter("ignore")
            if dynamo:
                program = torch.onnx.export(
                    model, args, dynamo=True, optimize=False, opset_version=max(ONNX_OPSET, 18), verbose=False
                )
                graph = program.model
            else:
                from edgec.torchscript_symbolics import register

                register()  # ops the TorchScript exporter has no symbolic for (nn.MultiheadAttention's fast path)
                # to a file, not memory: over protobuf's 2 GiB the exporter writes the weights as external data
                with tempfile.TemporaryDirectory(prefix="edgec-export-") as scratch:
                    exported = Path(scratch) / "model.onnx"
                    torch.onnx.export(
                        model,
                        args,
                        str(exported),
                        dynamo=False,
                        opset_version=ONNX_OPSET,
                        input_names=_torchscript_input_names(model, len(args)),
                        # EVAL mode would fuse Conv+BatchNorm inside the exporter; keep BN for the fold-bn pass
                        training=torch.onnx.TrainingMode.PRESERVE,
                    )
                    graph = ir.external_data.load_to_model(ir.load(exported))  # weights into memory before the files go
    except InputShapeError:
        raise
    except Exception as error:  # noqa: BLE001 - exporter errors come in many types
        log.debug("exporter output:\n%s", "".join(output))
        raise LoadError(
            f"exporting '{path}' to ONNX failed: {_first_line(error)}. "
            "Check that --input-shape matches what the model expects"
        ) from None
    log.debug("exporter output:\n%s", "".join(output))
    _name_outputs(graph)
    return graph


@contextlib.contextmanager
def captured_output(sink: list[str]) -> Iterator[None]:
    """Everything written to stdout and stderr inside, by Python or by C++ code (file
    descriptors 1 and 2: the TorchScript exporter prints its IR from C++), is appended to
    ``sink`` instead of reaching the terminal."""
    import ctypes

    with contextlib.ExitStack() as stack:
        python_out = stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        python_err = stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        try:
            saved = [os.dup(1), os.dup(2)]
        except OSError:  # no such descriptors: nothing C++ writes can reach a terminal
            saved = []
        scratch = stack.enter_context(tempfile.TemporaryFile())
        try:
            for fd in (1, 2) if saved else ():
                os.dup2(scratch.fileno(), fd)
            yield
        finally:
            if saved:
                ctypes.CDLL(None).fflush(None)  # C stdio buffers still hold what C++ wrote to a pipe
            for fd, copy in zip((1, 2), saved, strict=False):
                os.dup2(copy, fd)
                os.close(copy)
            scratch.seek(0)
            sink.append(python_out.getvalue() + python_err.getvalue() + scratch.read().decode(errors="replace"))


def _torchscript_input_names(module, count: int) -> list[str]:
    """The forward() argument names of a ScriptModule ('x', not the exporter's 'x.1')."""
    try:
        names = [argument.name for argument in module.forward.schema.arguments[1:]]
    except AttributeError:
        names = []
    if len(names) != count or len(set(names)) != count:
        return [f"input_{index}" for index in range(count)]
    return names


def _name_outputs(graph: ir.Model) -> None:
    """Give exporter-numbered outputs ('484') readable names: output, output_1, ..."""
    outputs = graph.graph.outputs
    taken = {value.name for value in graph.graph.inputs}
    for index, value in enumerate(outputs):
        if value.name and not value.name.isdigit():
            continue
        name = "output" if len(outputs) == 1 else f"output_{index}"
        if name not in taken:
            value.name = name


def _torch_runner(module) -> Callable[..., list[np.ndarray]]:
    def run(*arrays: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            result = module(*(torch.from_numpy(np.ascontiguousarray(array)) for array in arrays))
        if isinstance(result, torch.Tensor):
            result = [result]
        return [tensor.detach().cpu().numpy() for tensor in result]

    return run


def cleanup(graph: ir.Model) -> None:
    """Inline, fold constants, drop dead nodes, lift constants, infer shapes (in place): see edgec/core/fold.py."""
    from edgec.core.fold import cleanup as clean

    clean(graph)


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """torch.export logs a traceback when its safe load fails: keep it off the user's terminal
    (the LoadError says what happened); -vv shows it."""
    logger = logging.getLogger("torch._export.serde.serialize")
    previous = logger.level
    if not log.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _blocked_global(error: BaseException) -> str:
    """The callable a weights-only unpickler refused (e.g. 'posix.system'), from its message."""
    import re

    found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(error))
    return found.group(1) if found else ""


def _first_line(error: BaseException) -> str:
    text = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (text[0] if text else error.__class__.__name__)[:300]


def _last_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else error.__class__.__name__)[:300]
