"""ONNX graphs to files and to ONNX Runtime, whatever the size of their weights.

Protobuf serializes at most 2 GiB in one message. A graph whose weights come
near that (vit_h_14, regnet_y_128gf: 2.5 GB) is written as ONNX's external-data
form instead: ``model.onnx`` holds the graph, ``model.onnx.data`` beside it the
weights, and ONNX Runtime opens it from that file. Smaller graphs stay one
file, as before.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

PROTOBUF_LIMIT = 1 << 31
# what a graph holds besides its initializers (nodes, names, shapes, small attributes) stays well under this
GRAPH_HEADROOM = 64 << 20


def _initializers(graph: ir.Model) -> Iterator[ir.Value]:
    for subgraph in (graph.graph, *graph.graph.subgraphs()):
        yield from subgraph.initializers.values()


def weight_bytes(graph: ir.Model) -> int:
    """The bytes of every initializer, in the main graph and its subgraphs."""
    return sum(value.const_value.nbytes for value in _initializers(graph) if value.const_value is not None)


def fits_one_message(graph: ir.Model) -> bool:
    """Whether ``graph`` serializes as one protobuf message (weights inside the .onnx file)."""
    return weight_bytes(graph) + GRAPH_HEADROOM < PROTOBUF_LIMIT


def data_file(path: Path) -> Path:
    """Where ``save`` puts the weights of a graph too large for one message: ``model.onnx.data``."""
    return path.with_name(path.name + ".data")


def _reads_files(graph: ir.Model) -> bool:
    """Whether some initializer still lives in an external data file (``ir.load`` of such a model)."""
    return any(isinstance(value.const_value, ir.ExternalTensor) for value in _initializers(graph))


def save(graph: ir.Model, path: Path) -> list[Path]:
    """Write ``graph`` to ``path`` (and its weights to ``data_file(path)`` when they do not fit one
    message, or already come from a data file); return the files written. ``graph`` is left as it was."""
    data = data_file(path)
    data.unlink(missing_ok=True)  # from an earlier build of a larger model
    if fits_one_message(graph) and not _reads_files(graph):
        ir.save(graph, path)
        return [path]
    ir.save(graph, path, external_data=data.name)
    return [path, data]


@contextlib.contextmanager
def ir_version_at_most(graph: ir.Model, version: int) -> Iterator[None]:
    """``graph.ir_version`` capped at ``version`` inside (for readers older than the writer)."""
    saved = graph.ir_version
    graph.ir_version = min(saved, version)
    try:
        yield
    finally:
        graph.ir_version = saved


def serialized(graph: ir.Model, max_ir_version: int) -> bytes | None:
    """The model's bytes, IR version capped, or None when it does not fit one message or reads its
    weights from files (bytes would name those files relative to nowhere)."""
    if not fits_one_message(graph) or _reads_files(graph):
        return None
    proto = ir.serde.serialize_model(graph)
    proto.ir_version = min(proto.ir_version, max_ir_version)
    return proto.SerializeToString()


@contextlib.contextmanager
def saved_copy(graph: ir.Model, max_ir_version: int) -> Iterator[Path]:
    """``graph`` in a temporary ``model.onnx`` (weights in ``model.onnx.data`` when large), removed on exit."""
    with tempfile.TemporaryDirectory(prefix="edgec-onnx-") as scratch, ir_version_at_most(graph, max_ir_version):
        path = Path(scratch) / "model.onnx"
        save(graph, path)
        yield path
