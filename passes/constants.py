"""The one rule every pass uses for "is this value a constant, and what is it".

A value is constant when no caller can change it and it does not depend on
the data:

- an initializer that is not a graph input (a caller may override those;
  before IR version 4, which lists every initializer as an input too, such
  an input counts as constant), or a ``Constant`` node's output;
- the output of a deterministic ONNX node of the main graph whose needed
  inputs are constant (``Reshape``, ``Transpose``, ``Cast``, ``Mul``,
  ``Sign``, ``ConstantOfShape``, ``Unsqueeze``... of initializers, as
  exporters leave computed weights), and ``Shape`` of a value of static shape
  (its data is not needed), ``CastLike`` (only its first input is).

Such subgraphs are evaluated on demand with ONNX's reference ops (the
evaluator onnxscript's constant folder uses too) for the values a pass asks
about, and the graph is left as it is: the ``fold`` compile stage
(edgec/core/fold.py) folds the whole graph before lowering, but a pass that
folded everything first would change nodes it does not rewrite, and its
``modified`` would not be exact. A matched layer's constant subgraph dies
with it (``GraphEditor.drop_if_dead``).

Results are memoised per ``Constants`` object (one per pass call): that is
sound because graph edits never change a value's constant in place
(passes/graph_edit.py makes a new value for a new constant).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from edgec.core.model import onnx_opset
from edgec.passes.graph_edit import describe, legacy_inputs

logger = logging.getLogger(__name__)

__all__ = ["Constants"]

_NON_DETERMINISTIC = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
_GRAPH_ATTRIBUTES = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


class Constants:
    """``constants(value)``: the value's array when it is constant (the module docstring's rule), else None."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.opset = onnx_opset(model)
        self.legacy_inputs = legacy_inputs(model)
        self.memo: dict[ir.Value, np.ndarray | None] = {}

    def __call__(self, value: ir.Value | None) -> np.ndarray | None:
        """Iterative depth-first evaluation, memoised; a node is known to be non-constant as soon
        as one input is (inputs are tried in order, so a data path stops at its first input,
        before its weights)."""
        if value is None:
            return None
        memo = self.memo
        stack = [value]
        while stack:
            current = stack[-1]
            if current in memo:
                stack.pop()
                continue
            leaf, array = self._leaf(current)
            if leaf:
                memo[current] = array
                stack.pop()
                continue
            producer = current.producer()
            pending = None
            non_constant = False
            for item in _needed_inputs(producer):
                if item is None:
                    continue
                if item not in memo:
                    pending = item
                    break
                if memo[item] is None:
                    non_constant = True
                    break
            if pending is not None:
                stack.append(pending)
                continue
            stack.pop()
            if non_constant:
                results: list[np.ndarray | None] = [None] * len(producer.outputs)
            else:
                results = self._evaluate(producer, [None if item is None else memo.get(item) for item in producer.inputs])
            for output, result in zip(producer.outputs, results, strict=True):
                memo[output] = result
        return memo[value]

    def _leaf(self, value: ir.Value) -> tuple[bool, np.ndarray | None]:
        """(True, array-or-None) when ``value``'s constness is known without looking at inputs."""
        if value.is_graph_input() and not (self.legacy_inputs and value.is_initializer()):
            return True, None
        if value.const_value is not None:
            return True, value.const_value.numpy()
        producer = value.producer()
        if producer is None or producer.graph is not self.graph or producer.domain != "":
            return True, None
        if producer.op_type == "Constant":
            tensor = ir.convenience.get_const_tensor(value)
            return True, None if tensor is None else tensor.numpy()
        if producer.op_type in _NON_DETERMINISTIC or any(
            attribute.type in _GRAPH_ATTRIBUTES for attribute in producer.attributes.values()
        ):
            return True, None
        return False, None

    def _evaluate(self, node: ir.Node, arrays: list[np.ndarray | None]) -> list[np.ndarray | None]:
        """Outputs of a node of constant inputs (ONNX reference ops); Nones when it cannot be evaluated."""
        none = [None] * len(node.outputs)
        if node.op_type == "Shape":
            source = node.inputs[0]
            shape = source.const_value.shape if source.const_value is not None else source.shape
            if shape is None or not all(isinstance(dim, int) for dim in shape):
                return none
            dims = [int(dim) for dim in shape]
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", len(dims))
            return [np.array(dims[start:end], dtype=np.int64)]
        if node.op_type == "CastLike":
            target = node.inputs[1].dtype if node.inputs[1] is not None else None
            if target is None or arrays[0] is None:
                return none
            return [arrays[0].astype(target.numpy())]
        from onnx.reference.ops import load_op

        try:
            implementation = load_op("", node.op_type, node.version or self.opset)
            attributes = {name: _attribute_value(attribute) for name, attribute in node.attributes.items()}
            results = implementation.eval(*arrays, **attributes)
        except Exception as error:  # noqa: BLE001 - the reference ops raise many kinds of errors
            logger.debug("cannot evaluate %s as a constant: %s", describe(node), error)
            return none
        if not isinstance(results, (tuple, list)):
            results = [results]
        arrays_out = [None if result is None else np.asarray(result) for result in results]
        return (arrays_out + none)[: len(node.outputs)]


def _needed_inputs(node: ir.Node) -> list[ir.Value | None]:
    """Inputs whose values a constant evaluation of ``node`` needs (Shape needs none, CastLike only its first)."""
    if node.op_type == "Shape":
        return []
    if node.op_type == "CastLike":
        return [node.inputs[0]]
    return list(node.inputs)


def _attribute_value(attribute: ir.Attr):
    if attribute.type == ir.AttributeType.TENSOR:
        return ir.serde.serialize_tensor(attribute.value)
    if isinstance(attribute.value, tuple):
        return list(attribute.value)
    return attribute.value
