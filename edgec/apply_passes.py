"""Apply graph passes to a Model and report what each one did.

Each pass runs in place on ``model.graph``; around it edgec measures nodes,
parameters, MACs and weight bytes, and the output deviation against the
graph before the pass on a fixed seeded input (ONNX Runtime). The reports
go to ``model.pass_reports`` and into ``manifest.json`` at compile time.

The standard twin. A pass that emits edgec ops (it has a ``pack`` option)
can make the same decisions in standard ONNX (``pack=false``: masked dense
weights, dequantized weights, the Sign nodes kept). From the first such pass
on, ``model.standard_graph`` is a copy of the graph to which every later
pass is applied in its standard form, so that the compiled build can be
checked against ONNX Runtime, not only against edgec's own NumPy versions
of its ops. When a pass acts differently on the two graphs (it changed a
different number of nodes in each, e.g. fuse-filters after a packing pass
that hides the layers from it), the twin is dropped and
``model.standard_note`` says why. A pass with a ``standard_form(graph)`` method
hands the twin what it decided on the graph (quantize-int8: the activation
ranges it calibrated), so the twin is not decided again on its own.
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

from edgec.core.errors import PassError
from edgec.core.inputs import random_inputs
from edgec.core.model import Model, input_signatures
from edgec.core.numerics import compare
from edgec.core.stats import model_stats

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
    if isinstance(value, np.ndarray):  # e.g. calibration data handed to a pass in Python
        return f"<{value.dtype} array {'x'.join(map(str, value.shape))}>"
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


def standard_equivalent(graph_pass: ir.passes.PassBase) -> ir.passes.PassBase:
    """The pass that makes ``graph_pass``'s decisions in standard ONNX: ``pack=False`` for a pass
    with a true ``pack`` option (it emits edgec ops), ``graph_pass`` itself for the others."""
    if dataclasses.is_dataclass(graph_pass) and "pack" in {field.name for field in dataclasses.fields(graph_pass)}:
        if graph_pass.pack:
            return dataclasses.replace(graph_pass, pack=False)
    return graph_pass


def copy_graph(graph: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(graph))


def _changed(before: collections.Counter, graph: ir.Model) -> int:
    after = _signatures(graph)
    return sum(((before - after) + (after - before)).values())


def _apply_to_twin(model: Model, graph_pass: ir.passes.PassBase, changed: int) -> None:
    """Apply ``graph_pass``'s standard equivalent to ``model.standard_graph`` (see the module docstring)."""
    twin_pass = standard_equivalent(graph_pass)
    packs = twin_pass is not graph_pass  # the twin gets the pass's standard-ONNX form: other nodes change
    form = getattr(graph_pass, "standard_form", None)
    if form is not None:  # the pass carries what it decided on the graph over to the twin (quantize-int8's ranges)
        twin_pass = form(model.graph)
    twin = model.standard_graph
    before = None if packs else _signatures(twin)
    try:
        result = twin_pass(twin)
    except (ir.passes.PassError, ir.passes.InvariantError) as error:
        model.standard_graph, model.standard_note = None, f"pass {pass_name(graph_pass)!r} failed on the standard twin: {error}"
        return
    model.standard_graph = result.model
    if before is not None and _changed(before, result.model) != changed:
        model.standard_graph = None
        model.standard_note = (
            f"pass {pass_name(graph_pass)!r} changed {changed} node(s) of the graph but a different number of its "
            "standard-ONNX twin (it acts on layers an earlier pass turned into edgec ops)"
        )
    if model.standard_graph is None:
        log.warning("no standard-ONNX equivalent of this graph for ONNX Runtime: %s", model.standard_note)


def apply(model: Model, passes: Sequence[ir.passes.PassBase], *, measure: bool = True, seed: int = 0) -> list[PassReport]:
    """Run ``passes`` in order on ``model`` (in place) and return one report per pass.

    ``measure=False`` skips the ONNX Runtime deviation check (faster, for big
    models); everything else is still reported.
    """
    from edgec.runtimes.reference import has_custom_ops, reference_outputs

    reports = []
    for graph_pass in passes:
        if not isinstance(graph_pass, ir.passes.PassBase):
            raise PassError(f"{graph_pass!r} is not an onnx_ir pass; see `edgec passes` for the available ones")
        before_stats = model_stats(model.graph)
        before_signatures = _signatures(model.graph)
        inputs = random_inputs(input_signatures(model.graph), seed) if measure else None
        before_outputs = reference_outputs(model.graph, inputs) if measure else None
        if model.standard_graph is None and not model.standard_note and standard_equivalent(graph_pass) is not graph_pass:
            if has_custom_ops(model.graph):
                model.standard_note = "the graph held edgec ops before any pass with a standard-ONNX form ran"
            else:
                model.standard_graph = copy_graph(model.graph)
        start = time.perf_counter()
        try:
            result = graph_pass(model.graph)
        except (ir.passes.PassError, ir.passes.InvariantError) as error:  # requires/ensures raise InvariantError
            raise PassError(f"pass {pass_name(graph_pass)!r} failed: {error}") from error
        seconds = time.perf_counter() - start
        if result.model is not model.graph:
            model.graph = result.model
        after_stats = model_stats(model.graph)
        changed = _changed(before_signatures, model.graph)
        if model.standard_graph is not None:
            _apply_to_twin(model, graph_pass, changed)
        abs_dev = rel_dev = None
        note = ""
        if measure and before_outputs is not None:
            after_outputs = reference_outputs(model.graph, inputs)
            if after_outputs is None:
                note = "deviation not measured: a custom op has no NumPy reference"
            else:
                agreement = compare(after_outputs, before_outputs, rtol=0.0, atol=0.0)  # the sizes, not a verdict
                abs_dev, rel_dev = agreement.max_abs, agreement.max_rel
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
