"""A binarised value within float32 rounding of 0: the packed build against its standard twin.

The BNN ResNet-18 of bench/binary.py failed ``edgec compile -p fold-bn -p
binary`` (error 0.433 on a logit) although every BinaryConv computes what
its ``pack=false`` twin computes (<= 6e-6 per layer on the same input): one
input of a ``Sign`` was +4.6e-7 exactly (float64), +6.0e-7 in the packed
graph (exact popcount, then ``dot * scale + bias``) and -4.8e-7 in ONNX
Runtime's float32 run of the twin (it sums 576 terms ``+-a*s``), and that
one flipped sign moved the logits by 0.43. The graph below builds that
pattern on purpose: ``x -> Sign -> Conv(+-a) -> Add(x * k) -> Sign ->
Conv(+-a2)``, with ``k`` putting one input of the second Sign between ONNX
Runtime's float32 value and the exact one. Checked both ways: the packed
graph (NumPy references) and the twin (float64) agree, ONNX Runtime's
float32 run of the twin does not, and the compiled build is verified
against the float64 evaluation.
"""

from __future__ import annotations

import numpy as np
import pytest

import edgec
from edgec.core.inputs import random_inputs
from edgec.core.model import input_signatures
from edgec.core.numerics import compare
from edgec.passes import LowerBinaryPass
from edgec.runtimes.reference import binarizing_nodes, checking_reference, run_float64, run_numpy_reference, run_onnxruntime

from backbone import make_onnx  # noqa: E402 - tests/ on sys.path (conftest.py)

C, H = 32, 8
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}  # compile's defaults


def _sign_weight(rng, outputs: int) -> np.ndarray:
    codes = np.where(rng.standard_normal((outputs, C, 3, 3)) < 0, -1.0, 1.0)
    return (codes * rng.uniform(0.05, 0.5, (outputs, 1, 1, 1))).astype(np.float32)


def _graph(w1: np.ndarray, w2: np.ndarray, k: np.ndarray):
    from onnx import helper

    nodes = [
        helper.make_node("Sign", ["x"], ["s1"], name="sign1"),
        helper.make_node("Conv", ["s1", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["x", "k"], ["r"], name="shortcut"),
        helper.make_node("Add", ["c1", "r"], ["z"], name="add"),
        helper.make_node("Sign", ["z"], ["s2"], name="sign2"),
        helper.make_node("Conv", ["s2", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    return make_onnx(nodes, {"x": [1, C, H, H]}, {"y": [1, 8, H, H]}, {"w1": w1, "w2": w2, "k": k})


def near_zero_bnn():
    """The graph (module docstring) and verify's input (seed 0): ``k`` is chosen, among the
    elements where ONNX Runtime's float32 conv1 is farthest from the exact one, so that the
    twin's float32 run binarises one input of sign2 the other way than the exact function."""
    rng = np.random.default_rng(3)
    w1, w2 = _sign_weight(rng, C), _sign_weight(rng, 8)
    ones = np.ones((1, C, 1, 1), np.float32)
    x = random_inputs(input_signatures(_graph(w1, w2, ones)), 0)[0]
    conv1 = _graph(w1, w2, ones)
    conv1.graph.outputs.append(next(node for node in conv1.graph if node.name == "conv1").outputs[0])
    exact = run_float64(conv1, [x])[1][0]
    ort = run_onnxruntime(conv1, [x])[1][0].astype(np.float64)
    for flat in np.argsort(-np.abs(ort - exact), axis=None)[:16]:
        c, i, j = np.unravel_index(flat, exact.shape)
        if x[0, c, i, j] == 0:
            continue
        k = ones.copy()
        k[0, c] = -(exact[c, i, j] + ort[c, i, j]) / 2 / x[0, c, i, j]  # z[c, i, j] between the two
        graph = _graph(w1, w2, k)
        if not compare(run_onnxruntime(graph, [x]), run_float64(graph, [x]), **TOLERANCE).ok:
            return graph, x
    pytest.fail("no element of conv1 where ONNX Runtime's float32 rounding flips sign2 (the premise)")


def test_packed_graph_matches_its_twin_at_a_binarisation_within_rounding_of_zero():
    graph, x = near_zero_bnn()
    model = edgec.from_onnx_ir(graph)
    edgec.apply(model, [LowerBinaryPass()], measure=False)
    assert [node.op_type for node in model.graph.graph] == ["BinaryConv", "Mul", "Add", "BinaryConv"]
    twin = model.standard_graph
    assert binarizing_nodes(twin) == ["sign1", "sign2"]
    packed = run_numpy_reference(model.graph, [x])
    float64 = run_float64(twin, [x])
    assert compare(packed, float64, **TOLERANCE).ok  # the same function
    float32 = compare(packed, run_onnxruntime(twin, [x]), **TOLERANCE)
    assert not float32.ok and float32.max_abs > 0.05  # ONNX Runtime's float32 rounding flipped a sign
    how, reference = checking_reference(twin, [x])
    assert how.startswith("float64") and "sign2" in how
    np.testing.assert_array_equal(reference[0], float64[0])


def test_compile_verifies_the_packed_build_against_the_float64_twin(tmp_path):
    graph, x = near_zero_bnn()
    model = edgec.from_onnx_ir(graph)
    edgec.apply(model, [LowerBinaryPass()])
    verification = edgec.compile(model, "x86", tmp_path / "bnn").manifest["verification"]
    assert verification["status"] == "passed"
    assert verification["float64"]["enforced"] and verification["float64"]["within_tolerance"]
    assert "reference.onnx" in verification["float64"]["graph"] and "sign2" in verification["float64"]["note"]
    assert verification["numpy"]["within_tolerance"]
    onnxruntime = verification["onnxruntime"]  # recorded: its float32 rounding flipped sign2
    assert not onnxruntime["enforced"] and not onnxruntime["within_tolerance"]
