"""Apply graph passes to a Model and report what each one did.

Each pass runs in place on ``model.graph``; around it edgec measures nodes,
parameters, MACs and weight bytes, and the output deviation against the
graph before the pass on a fixed seeded input (ONNX Runtime). The reports
go to ``model.pass_reports`` and into ``manifest.json`` at compile time.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec.errors import PassError
from edgec.model import Model
from edgec.numerics import deviation
from edgec.stats import model_stats

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PassReport:
    name: str
    options: dict[str, Any]
    modified: bool
    nodes_changed: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    size_before: int
    size_after: int
    max_abs_deviation: float | None
    max_rel_deviation: float | None
    seconds: float
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pass_name(graph_pass: ir.passes.PassBase) -> str:
    return getattr(graph_pass, "cli_name", type(graph_pass).__name__)


def pass_options(graph_pass: ir.passes.PassBase) -> dict[str, Any]:
    if dataclasses.is_dataclass(graph_pass):
        return {field.name: _jsonable(getattr(graph_pass, field.name)) for field in dataclasses.fields(graph_pass)}
    return {key: _jsonable(value) for key, value in vars(graph_pass).items() if not key.startswith("_")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _signatures(graph: ir.Model) -> collections.Counter:
    """A multiset of node fingerprints: op, name, inputs, and the bytes of constant inputs."""
    counter: collections.Counter = collections.Counter()
    for node in graph.graph:
        inputs = []
        for value in node.inputs:
            if value is None:
                inputs.append(None)
            elif value.const_value is not None:
                array = value.const_value.numpy()
                inputs.append((value.name, array.shape, hash(array.tobytes())))
            else:
                inputs.append(value.name)
        counter[(node.domain, node.op_type, node.name, tuple(inputs), repr(sorted(node.attributes)))] += 1
    return counter


def apply(model: Model, passes: Sequence[ir.passes.PassBase], *, measure: bool = True, seed: int = 0) -> list[PassReport]:
    """Run ``passes`` in order on ``model`` (in place) and return one report per pass.

    ``measure=False`` skips the ONNX Runtime deviation check (faster, for big
    models); everything else is still reported.
    """
    from edgec.frontend import input_arrays
    from edgec.runtimes.reference import reference_outputs

    reports = []
    for graph_pass in passes:
        if not isinstance(graph_pass, ir.passes.PassBase):
            raise PassError(f"{graph_pass!r} is not an onnx_ir pass; see `edgec passes` for the available ones")
        before_stats = model_stats(model.graph)
        before_signatures = _signatures(model.graph)
        inputs = input_arrays(model, seed) if measure else None
        before_outputs = reference_outputs(model.graph, inputs) if measure else None
        start = time.perf_counter()
        try:
            result = graph_pass(model.graph)
        except (ir.passes.PassError, ir.passes.InvariantError) as error:  # requires/ensures raise InvariantError
            raise PassError(f"pass {pass_name(graph_pass)!r} failed: {error}") from error
        seconds = time.perf_counter() - start
        if result.model is not model.graph:
            model.graph = result.model
        after_stats = model_stats(model.graph)
        changed = sum(((before_signatures - _signatures(model.graph)) + (_signatures(model.graph) - before_signatures)).values())
        abs_dev = rel_dev = None
        note = ""
        if measure and before_outputs is not None:
            after_outputs = reference_outputs(model.graph, inputs)
            if after_outputs is None:
                note = "deviation not measured: a custom op has no NumPy reference"
            else:
                abs_dev, rel_dev = deviation(after_outputs, before_outputs)
        report = PassReport(
            name=pass_name(graph_pass),
            options=pass_options(graph_pass),
            modified=bool(result.modified),
            nodes_changed=changed,
            params_before=before_stats.params,
            params_after=after_stats.params,
            macs_before=before_stats.macs,
            macs_after=after_stats.macs,
            size_before=before_stats.size_bytes,
            size_after=after_stats.size_bytes,
            max_abs_deviation=abs_dev,
            max_rel_deviation=rel_dev,
            seconds=seconds,
            note=note,
        )
        log.info("pass %s: modified=%s, %d node(s) changed", report.name, report.modified, changed)
        model.pass_reports.append(report)
        reports.append(report)
    return reports
