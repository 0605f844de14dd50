"""The float32 agreement rule (edgec/core/numerics.py): outputs agree on their scale, so large
outputs verify where an element-wise rule refuses them, and a wrong kernel still fails (issue 15)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import edgec
import edgec.lower
from backbone import make_onnx
from edgec.core.errors import VerificationError
from edgec.core.numerics import compare
from edgec.runtimes.reference import run_onnxruntime


def large_activation_cnn() -> ir.Model:
    """A held-out edge CNN with unnormalised random weights (0.6 N(0, 1)): outputs up to about 9000, so that
    float32 summation-order differences (a few ulps of the partial sums) exceed 1e-4 on the small elements."""
    rng = np.random.default_rng(11)
    nodes, initializers, previous, channels = [], {}, "x", 3
    for index, width in enumerate((32, 64, 64, 16)):
        weight, bias = f"w{index}", f"b{index}"
        initializers[weight] = (0.6 * rng.standard_normal((width, channels, 3, 3))).astype(np.float32)
        initializers[bias] = rng.standard_normal(width).astype(np.float32)
        output = f"c{index}"
        nodes.append(helper.make_node("Conv", [previous, weight, bias], [output], pads=[1, 1, 1, 1], name=f"conv{index}"))
        if index < 3:
            nodes.append(helper.make_node("Relu", [output], [f"r{index}"]))
            output = f"r{index}"
        previous, channels = output, width
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    return make_onnx(nodes, {"x": [1, 3, 24, 24]}, {"y": [1, 16, 24, 24]}, initializers)


def test_large_outputs_verify_and_the_old_rule_would_refuse_them(tmp_path):
    from edgec.core.inputs import random_inputs
    from edgec.core.model import input_signatures
    from edgec.runtimes.local import LocalRunner

    model = edgec.from_onnx_ir(large_activation_cnn())
    result = edgec.compile(model, "x86", tmp_path / "big")
    check = result.manifest["verification"]["onnxruntime"]
    assert result.manifest["verification"]["status"] == "passed" and check["within_tolerance"]
    inputs = random_inputs(input_signatures(model.graph))
    got = LocalRunner(result.artifact).run(inputs)[0]
    (want,) = run_onnxruntime(model.graph, inputs)
    assert np.abs(want).max() > 3000  # the outputs are large ...
    assert check["max_rel"] < 1e-5  # ... and agree to float32 precision on their scale,
    assert not np.allclose(got, want, rtol=1e-4, atol=1e-4)  # which the element-wise rule refused


def test_a_wrong_kernel_still_fails(tmp_path, monkeypatch):
    """Build a kernel whose one output channel is off by 1e-3 of the output's scale: refused, and the
    message names the element and the rule."""
    model = edgec.from_onnx_ir(large_activation_cnn())
    real_to_relax = edgec.lower.to_relax

    def wrong_kernel(graph, target=None):
        wrong = ir.serde.deserialize_model(ir.serde.serialize_model(graph))
        bias = wrong.graph.initializers["b3"]
        values = bias.const_value.numpy().copy()
        values[5] += 9.0  # outputs are ~9000 at most: 1e-3 of the scale, on one channel of 16
        bias.const_value = ir.tensor(values, name="b3")
        return real_to_relax(wrong, target)

    monkeypatch.setattr(edgec.lower, "to_relax", wrong_kernel)
    with pytest.raises(VerificationError) as error:
        edgec.compile(model, "x86", tmp_path / "wrong")
    message = str(error.value)
    assert "element [0, 5, " in message and "largest |value|" in message and "allowed" in message


def test_compare_rule():
    big = np.array([1000.0, 0.001, -500.0], np.float32)
    assert compare([big + np.float32(0.01)], [big], rtol=1e-4, atol=1e-4).ok  # 1e-5 of the scale
    off = compare([big + np.array([0, 1.0, 0], np.float32)], [big], rtol=1e-4, atol=1e-4, names=["y"])
    assert not off.ok and "output 'y' element [1]" in off.detail and "> 0.1" in off.detail
    nan = np.array([np.nan, 1.0], np.float32)
    assert compare([nan], [nan], rtol=1e-4, atol=1e-4).ok  # NaN where the reference has NaN
    assert not compare([np.array([np.nan, 1.0], np.float32)], [np.array([0.0, 1.0], np.float32)], rtol=1e-4, atol=1e-4).ok
    assert not compare([np.zeros((2, 2))], [np.zeros((2, 3))], rtol=1, atol=1).ok


def test_int8_tolerance_uses_the_larger_of_one_step_and_the_noise():
    from edgec.core.numerics import INT8_NOISE_FACTOR, int8_tolerance

    want = [np.linspace(0.0, 2.55, 1000, dtype=np.float32)]  # output step 0.01
    fused = [want[0] + np.float32(0.04)]  # ORT fused 4 steps from as written on this input
    allowed, step, spread = int8_tolerance(want, None, 1.0)
    assert np.isclose(step, 0.01) and spread == 0.0 and np.isclose(allowed, 0.01)  # one step
    allowed, _, spread = int8_tolerance(want, fused, 1.0)
    assert np.isclose(spread, 0.04) and np.isclose(allowed, INT8_NOISE_FACTOR * 0.04)
    # the noise compile measured over its inputs (in steps) when larger than this input's spread
    assert np.isclose(int8_tolerance(want, fused, 1.0, noise_steps=10.0)[0], INT8_NOISE_FACTOR * 0.1)
    assert np.isclose(int8_tolerance(want, fused, 1.0, noise_steps=1.0)[0], INT8_NOISE_FACTOR * 0.04)
