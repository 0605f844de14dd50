"""The one random-input rule (edgec/core/inputs.py): seeded, floats standard normal, integers
0/1 inside a Gather's index range; the same arrays for a model and for its artifact."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.core.inputs import random_array, random_inputs
from edgec.core.model import input_signatures


def _gather_model(rows: int) -> ir.Model:
    """y = Gather(table, indices) + 0 * x: a float input and an int64 index input."""
    x = ir.Value(name="x", shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    indices = ir.Value(name="indices", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.INT64))
    table = ir.Value(
        name="table", shape=ir.Shape([rows, 3]), type=ir.TensorType(ir.DataType.FLOAT),
        const_value=ir.tensor(np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)),
    )
    gather = ir.Node("", "Gather", [table, indices], name="gather")
    add = ir.Node("", "Add", [gather.outputs[0], x], name="add")
    add.outputs[0].name = "y"
    graph = ir.Graph([x, indices], add.outputs, nodes=[gather, add], initializers=[table], opset_imports={"": 17})
    return ir.Model(graph, ir_version=8)


def test_same_seed_same_arrays_and_dtypes():
    specs = [{"shape": [2, 3], "dtype": "float32"}, {"shape": [4], "dtype": "int64"}, {"shape": [], "dtype": "float64"}]
    first, again, other = random_inputs(specs, 5), random_inputs(specs, 5), random_inputs(specs, 6)
    assert [a.dtype.name for a in first] == ["float32", "int64", "float64"]
    assert [a.shape for a in first] == [(2, 3), (4,), ()]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_integers_are_never_all_zero_and_stay_in_range():
    rng = np.random.default_rng(0)
    free = random_array([1000], "int32", rng)
    assert set(np.unique(free)) == {0, 1}
    assert set(np.unique(random_array([1000], "int64", rng, [-4, 3]))) == {0, 1}
    assert set(np.unique(random_array([1000], "int64", rng, [-1, 0]))) == {0}  # a Gather over one row


def test_model_signatures_carry_the_gather_index_range():
    signatures = input_signatures(_gather_model(rows=1))
    assert [s["name"] for s in signatures] == ["x", "indices"]
    assert "index_range" not in signatures[0]
    assert signatures[1]["index_range"] == [-1, 0]
    x, indices = random_inputs(signatures, seed=1)
    assert x.dtype == np.float32 and x.shape == (2, 3) and x.std() > 0
    assert indices.dtype == np.int64 and not indices.any()  # index 1 would read past the one row
