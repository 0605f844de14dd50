"""Graph surgery shared by the passes: fresh names, new initializers, rerouting, dead code.

A pass makes one ``GraphEditor`` per call (working state, never stored on the
pass) and names, adds initializers, reroutes and removes through it (it
inserts new nodes with onnx_ir's own ``insert_after``/``insert_before``), so
that names stay unique and nothing a rewrite leaves unused survives it.

Two rules keep the edits safe for memoised constant evaluation
(passes/constants.py): a new constant is always a new ``ir.Value`` (never a
``const_value`` changed in place), and a value that dies is removed, not
reused. Before IR version 4 every initializer was also a graph input: the
editor keeps that listing in step (``legacy_inputs``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

__all__ = ["GraphEditor", "describe", "input_at", "legacy_inputs", "value_name"]


def describe(node: ir.Node) -> str:
    """``Conv 'conv1'``: the op (with its domain unless ONNX's) and the node's name, or its first output's."""
    name = node.name or (node.outputs[0].name if node.outputs else "") or "?"
    op = node.op_type if node.domain == "" else f"{node.domain}.{node.op_type}"
    return f"{op} '{name}'"


def input_at(node: ir.Node, index: int) -> ir.Value | None:
    """The node's input ``index``, None when it is omitted (optional inputs such as a bias)."""
    return node.inputs[index] if len(node.inputs) > index else None


def value_name(value: ir.Value | None) -> str:
    """The value's name for a message, ``?`` when it has none."""
    return (value.name if value is not None else None) or "?"


def legacy_inputs(model: ir.Model) -> bool:
    """Before IR version 4 every initializer is listed as a graph input too; there such an input
    is a weight, not something a caller overrides."""
    return model.ir_version is not None and model.ir_version < 4


class GraphEditor:
    """Edits of ``model``'s main graph that keep names unique and drop what becomes dead."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.legacy_inputs = legacy_inputs(model)
        self.names: set[str] = set(self.graph.initializers)
        self.names.update(value.name for value in self.graph.inputs if value.name)
        for node in ir.traversal.RecursiveGraphIterator(self.graph):
            self.names.update(value.name for value in node.outputs if value.name)
            if node.name:
                self.names.add(node.name)

    def unique(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``... the first no value or node of the graph has; reserved."""
        name, counter = base, 0
        while name in self.names:
            counter += 1
            name = f"{base}_{counter}"
        self.names.add(name)
        return name

    def new_initializer(self, array: np.ndarray, base: str) -> ir.Value:
        """A new initializer holding ``array``, named ``unique(base)``."""
        tensor = ir.tensor(np.asarray(array, order="C"))  # not ascontiguousarray: it makes a scalar 1-D
        value = ir.Value(
            name=self.unique(base), shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
        )
        self.graph.register_initializer(value)
        if self.legacy_inputs:
            self.graph.inputs.append(value)
        return value

    def set_input(self, node: ir.Node, index: int, array: np.ndarray, base: str | None = None) -> ir.Value:
        """Give input ``index`` of ``node`` (added if missing) a new constant ``array``.

        The old input is dropped first when nothing else reads it, so the new
        initializer takes its name (or ``base``, or ``<node>_<index>``)."""
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        old = node.inputs[index]
        if base is None:
            base = old.name if old is not None and old.name else f"{node.name or node.op_type}_{index}"
        node.replace_input_with(index, None)
        self.drop_if_dead(old)
        value = self.new_initializer(array, base)
        node.replace_input_with(index, value)
        return value

    def replace_output(self, old: ir.Value, new: ir.Value) -> None:
        """Every reader of ``old`` (graph outputs included) reads ``new``, which takes ``old``'s
        name, and its shape and type where known."""
        name = old.name
        if old.shape is not None:
            new.shape = old.shape
        if old.type is not None:
            new.type = old.type
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        if name and new.name != name:
            old.name = None
            self.names.discard(new.name)
            new.name = name

    def remove(self, nodes: Iterable[ir.Node]) -> None:
        """Remove ``nodes`` (whose outputs nothing reads any more) from the graph."""
        nodes = list(nodes)
        self.graph.remove(nodes, safe=True)
        for node in nodes:
            self.names.difference_update(value.name for value in node.outputs if value.name)

    def replace_node(self, old: ir.Node, new_output: ir.Value) -> None:
        """Route ``old``'s first output to ``new_output`` (``replace_output``) and remove ``old``."""
        self.replace_output(old.outputs[0], new_output)
        self.remove([old])

    def drop_if_dead(self, value: ir.Value | None) -> None:
        """Remove ``value`` when nothing reads it: an initializer, or the nodes computing it, and
        then whatever fed only them (a constant subgraph dies with the layer it fed)."""
        stack = [value]
        while stack:
            value = stack.pop()
            if value is None or value.uses() or value.is_graph_output():
                continue
            if value.is_graph_input():
                if not (self.legacy_inputs and value.is_initializer()):
                    continue
                self.graph.inputs.remove(value)
            if value.is_initializer():
                if value.name is not None and self.graph.initializers.get(value.name) is value:
                    self.graph.initializers.pop(value.name)
                    self.names.discard(value.name)
                continue
            producer = value.producer()
            if producer is None or producer.graph is not self.graph:
                continue
            if any(output.uses() or output.is_graph_output() for output in producer.outputs):
                continue
            inputs = list(producer.inputs)
            self.remove([producer])
            stack.extend(inputs)
