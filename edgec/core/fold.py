"""Constant folding on ONNX IR: constant subgraphs become initializers.

Model-zoo files often compute their weights in the graph instead of storing
them: ``ConstantOfShape`` (the onnx wheel's ``light_*`` models hold every
weight that way), ``Reshape``/``Transpose``/``Cast``/``Mul`` of constants,
``Constant`` nodes. TVM's importer then builds those weights at run time, and
edgec's schedule rules, which expect constant weights, do not recognise the
kernels. Folding them first makes such a model look like any other.

The folding itself is onnxscript's (``FoldConstantsPass``, which evaluates a
node with ONNX's reference implementation); edgec only widens what it folds:
every deterministic node whose inputs are all constants, whatever their size,
ConstantOfShape included (onnxscript keeps ConstantOfShape and nodes with
inputs over 8192 elements by default, to keep files small; a deployed model
wants its weights as data). Results over ``MAX_FOLDED_ELEMENTS`` stay nodes.

Two users, one configuration:

- ``cleanup`` after loading (every source format): function inlining, folding,
  unused nodes removed, constants lifted to initializers, shape inference,
  topological order. Graph passes see initializers.
- ``fold_constants`` as the compile pipeline's ``fold`` stage, right before
  lowering, on whatever the passes (or a Python caller) left.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections import Counter

import onnx_ir as ir

from edgec.core.model import is_standard

log = logging.getLogger(__name__)

# a folded tensor larger than this (float32: 512 MiB) stays a node; VGG's largest weight is 103M
MAX_FOLDED_ELEMENTS = 1 << 27
_CONTROL_FLOW = {ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS}
_RANDOM_OPS = {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial"}


@dataclasses.dataclass(frozen=True)
class FoldReport:
    """What ``fold_constants`` removed: node counts per op type, and nodes before/after."""

    folded: dict[str, int]
    nodes_before: int
    nodes_after: int

    @property
    def modified(self) -> bool:
        return self.nodes_before != self.nodes_after or bool(self.folded)


def _all_inputs_constant(node: ir.Node) -> bool | None:
    """onnxscript's ``should_fold``: True to fold a node of constants whatever its size, None
    (its default rules) for the rest."""
    if not is_standard(node) or node.op_type in _RANDOM_OPS:
        return None
    if any(attribute.type in _CONTROL_FLOW for attribute in node.attributes.values()):
        return None
    inputs = [value for value in node.inputs if value is not None]
    if inputs and all(value.const_value is not None and not value.is_graph_input() for value in inputs):
        return True
    return None


def folding_pass() -> ir.passes.PassBase:
    from onnxscript.optimizer import _constant_folding

    return _constant_folding.FoldConstantsPass(
        shape_inference=True,
        input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
        output_size_limit=MAX_FOLDED_ELEMENTS,
        should_fold=_all_inputs_constant,
    )


def _unsqueeze_axes_as_attribute(graph: ir.Model) -> None:
    """onnxscript 0.7.2 rewrites ConcatFromSequence(new_axis=1) into Unsqueeze with ``axes`` as
    an input (opset 13 and later) whatever the model's opset; before opset 13 ``axes`` is an
    attribute, and TVM's importer (like ONNX shape inference) fails on the input form. Put such
    constant ``axes`` back into the attribute."""
    if graph.opset_imports.get("", 13) >= 13:
        return
    for node in ir.traversal.RecursiveGraphIterator(graph.graph):
        if node.op_type != "Unsqueeze" or not is_standard(node) or len(node.inputs) != 2:
            continue
        axes = node.inputs[1]
        if axes is None or axes.const_value is None:
            continue
        node.attributes["axes"] = ir.AttrInt64s("axes", [int(axis) for axis in axes.const_value.numpy().reshape(-1)])
        node.resize_inputs(1)


def fold_constants(graph: ir.Model) -> FoldReport:
    """Fold constant subgraphs of ``graph`` into initializers, in place (the ``fold`` stage)."""
    import onnx_ir.passes.common as common

    before = Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(graph.graph))
    pipeline = ir.passes.Sequential(
        ir.passes.PassManager([folding_pass(), common.RemoveUnusedNodesPass()], steps=3, early_stop=True),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline(graph)
    _unsqueeze_axes_as_attribute(graph)
    after = Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(graph.graph))
    folded = {op: count - after.get(op, 0) for op, count in sorted(before.items()) if count > after.get(op, 0)}
    report = FoldReport(folded, sum(before.values()), sum(after.values()))
    if report.folded:
        log.info(
            "constant folding: %d of %d nodes folded into initializers (%s)",
            report.nodes_before - report.nodes_after, report.nodes_before,
            ", ".join(f"{count} {op}" for op, count in report.folded.items()),
        )
    return report


def cleanup(graph: ir.Model) -> None:
    """Inline, fold constants, drop dead nodes, lift constants, infer shapes (in place)."""
    import onnx_ir.passes.common as common

    folding = ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([folding_pass(), common.RemoveUnusedNodesPass()], steps=3, early_stop=True),
    )
    tidying = ir.passes.Sequential(
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.ShapeInferencePass(),
        common.TopologicalSortPass(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folding(graph)
        _unsqueeze_axes_as_attribute(graph)
        tidying(graph)
