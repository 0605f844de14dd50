"""A fast subset of the conformance corpus (bench/conformance.py): cases from the ONNX backend
test data in the onnx wheel that once failed in edgec while plain TVM passed, each compiled by
plain TVM and by edgec (defaults, x86) and checked against the shipped outputs (or ONNX
Runtime for the light zoo model). The whole corpus: ``python bench/conformance.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench" / "conformance.py"

# case -> why it is here
CASES = {
    "test_PReLU_2d": "opset 6: ONNX Runtime has no kernel, edgec verifies with onnx's reference evaluator",
    "test_BatchNorm2d_eval": "opset 6 BatchNormalization, as above, through the BN rewrite",
    "test_Conv2d_depthwise_strided": "a depthwise convolution through the layout pass and the schedule library",
    "test_operator_max": "Max of tensors (pytorch-operator)",
    "light_squeezenet": "a zoo model: weights from ConstantOfShape (folded), a Dropout ConvertLayout cannot convert",
}


@pytest.fixture(scope="module")
def conformance():
    spec = importlib.util.spec_from_file_location("conformance_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name.startswith("light_") else name for name in CASES])
def test_edgec_passes_what_plain_tvm_passes(conformance, name):
    (case,) = [case for case in conformance.discover() if case.name == name]
    result = conformance.run_case(case)
    assert result["tvm"]["passed"], result["tvm"]["reason"]  # the corpus still means what it meant
    assert result["edgec"]["passed"], result["edgec"]["reason"]


def test_the_corpus_is_where_the_bench_looks(conformance):
    cases = conformance.discover()
    by_category = {category: [case for case in cases if case.category == category] for category in conformance.CATEGORIES}
    assert all(by_category.values())  # every corpus found
    assert all(case.data_sets for category in ("simple", "pytorch-converted", "pytorch-operator")
               for case in by_category[category])
    assert len(by_category["light"]) == 9


def test_compare_judges_shapes_values_and_nan(conformance):
    import numpy as np

    want = [np.array([1.0, np.nan, 3.0], dtype=np.float32)]
    assert conformance.compare([np.array([1.0, np.nan, 3.0005])], want, 1e-3, 1e-5) == ""
    assert "differs" in conformance.compare([np.array([1.0, np.nan, 3.1])], want, 1e-3, 1e-5)
    assert "shape" in conformance.compare([np.zeros(2)], want, 1e-3, 1e-5)
    assert "exact" in conformance.compare([np.array([1, 2])], [np.array([1, 3])], 1e-3, 1e-5)
