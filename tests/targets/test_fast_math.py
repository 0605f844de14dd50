"""targets/schedules/fast_math.py: float32 exp/sigmoid/erf as polynomials that vectorise, and
divisions by a constant as products.

Checked: what the rewrite leaves in the TIR (no exp/sigmoid/erf call of float32, float64
untouched, the caller's module unchanged), its numbers against NumPy/SciPy-free references
over float32's whole range (a sweep, run here by TVM's LLVM build of the rewritten kernels),
the machine code (no libm ``expf``/``erff`` call left in a SiLU/GELU model's lib.so), and
whole builds with SiLU, Sigmoid and erf-GELU verified against ONNX Runtime on x86 and on the
emulated cortex-a53. Divisions: which the rewrite turns into products (float32 by a constant
with a normal reciprocal) and which it keeps, the products' error against the division (exact
for a power of two), and a hard-swish model's x86 lib.so without ``vdivps``, verified.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from onnx import helper

import edgec
from backbone import assert_board_verified, disassembly, make_onnx, needs_objdump
from edgec.targets.schedules.fast_math import REWRITTEN, fast_math

SWEEP = np.concatenate([np.linspace(-110, 110, 44001), np.linspace(-6, 6, 24001)]).astype(np.float32)


def _module(dtype: str = "float32", size: int = SWEEP.size):
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((size,), dtype)):
            with R.dataflow():
                out = (R.exp(x), R.sigmoid(x), R.erf(x))
                R.output(out)
            return out

    return relax.transform.LegalizeOps()(Module)


def _calls(mod) -> list[tuple[str, str]]:
    import tvm
    import tvm_ffi
    from tvm import tirx

    found: list[tuple[str, str]] = []
    for _gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            tvm_ffi.structural_walk(
                func.body, [(tvm.ir.Call, lambda call: found.append((getattr(call.op, "name", ""), str(call.ty))))], order="post"
            )
    return [(name, dtype) for name, dtype in found if name in REWRITTEN]


def _run(mod, x: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(relax.build(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    inputs = x if isinstance(x, list) else [x]
    return [output.numpy() for output in vm["main"](*(tvm.runtime.tensor(value) for value in inputs))]


def test_rewrite_leaves_no_float32_call_and_keeps_float64():
    before = _module()
    assert sorted(name for name, _ in _calls(before)) == sorted(REWRITTEN)
    after = fast_math()(before)
    assert _calls(after) == []
    assert len(_calls(before)) == 3  # the pass works on a copy
    wide = _module("float64", 8)
    assert _calls(fast_math()(wide)) == _calls(wide) and len(_calls(wide)) == 3


def test_polynomials_match_libm_over_float32_range():
    mod = _module()
    exact = _run(mod, SWEEP)  # TVM's default lowering: libm's expf / erff
    fast = _run(fast_math()(mod), SWEEP)
    exp, sigmoid, erf = fast
    assert not np.array_equal(exp, exact[0])  # a different implementation ran (the first test: it is the rewrite's)
    normal = np.isfinite(exact[0]) & (exact[0] >= np.finfo(np.float32).tiny)
    assert np.max(np.abs(exp[normal] / exact[0][normal] - 1)) < 5e-7
    # overflow and underflow where float32's exp overflows / underflows, not a clamped finite value
    assert np.array_equal(np.isinf(exp), np.isinf(exact[0])) and np.isinf(exp).sum() > 0
    assert np.all(np.abs(exp[~normal & np.isfinite(exact[0])]) < 2 * np.finfo(np.float32).tiny)
    assert np.max(np.abs(sigmoid - exact[1])) < 3e-7 and sigmoid.min() >= 0 and sigmoid.max() <= 1
    want_erf = np.array([math.erf(float(v)) for v in SWEEP])
    assert np.max(np.abs(erf - want_erf)) < 5e-7 and np.max(np.abs(exact[2] - want_erf)) < 5e-7


def _activations_model(path):
    """A conv with SiLU (x * Sigmoid(x)), a squeeze-excite style Sigmoid gate and an erf GELU."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["c", "s"], ["silu"]),
        helper.make_node("GlobalAveragePool", ["silu"], ["g"]),
        helper.make_node("Sigmoid", ["g"], ["gate"]),
        helper.make_node("Mul", ["silu", "gate"], ["se"]),
        helper.make_node("Div", ["se", "root2"], ["half"]),
        helper.make_node("Erf", ["half"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["se", "e1"], ["gelu2"]),
        helper.make_node("Mul", ["gelu2", "half_c"], ["y"]),
    ]
    initializers = {
        "w": rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.3, "b": rng.standard_normal(32).astype(np.float32),
        "root2": np.float32(math.sqrt(2)), "one": np.float32(1), "half_c": np.float32(0.5),
    }  # fmt: skip
    return make_onnx(nodes, {"x": [1, 16, 20, 20]}, {"y": [1, 32, 20, 20]}, initializers, path)


def test_x86_build_calls_no_libm_exp_and_verifies(tmp_path):
    _activations_model(tmp_path / "m.onnx")
    result = edgec.compile(edgec.load(tmp_path / "m.onnx"), "x86", tmp_path / "x86")
    check = result.manifest["verification"]
    assert check["status"] == "passed" and check["onnxruntime"]["within_tolerance"]
    if shutil.which("objdump"):
        calls = disassembly(tmp_path / "x86" / "lib.so")
        assert "expf" not in calls and "erff" not in calls
    plain = edgec.compile(edgec.load(tmp_path / "m.onnx"), "x86", tmp_path / "plain", schedules=False)
    if shutil.which("objdump"):
        calls = disassembly(tmp_path / "plain" / "lib.so")
        assert "expf" in calls  # the naive build keeps libm (the check above can fail)
    assert plain.manifest["verification"]["status"] == "passed"


def test_cortex_a53_build_verified_on_the_emulated_board(tmp_path):
    _activations_model(tmp_path / "m.onnx")
    result = edgec.compile(edgec.load(tmp_path / "m.onnx"), "cortex-a53", tmp_path / "a53")
    assert_board_verified(result.manifest, "cortex-a53")


@pytest.mark.parametrize("value", [-200.0, -104.0, -87.5, 0.0, 88.7, 88.8, 300.0])
def test_exp_edges(value):
    got = _run(fast_math()(_module(size=1)), np.array([value], np.float32))[0][0]
    with np.errstate(over="ignore"):
        want = np.exp(np.float32(value))
    assert (np.isinf(got) and np.isinf(want)) or abs(got - want) <= 5e-7 * abs(want) + 2 * np.finfo(np.float32).tiny


HUGE = 2.0**127  # float32's reciprocal 2**-127 is a denormal


def _divisions_module(size: int = SWEEP.size):
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((size,), "float32"), y: R.Tensor((size,), "float32"), w: R.Tensor((size,), "float64")):
            with R.dataflow():
                out = (
                    R.divide(x, R.const(6.0, "float32")),  # a product by fl(1/6)
                    R.divide(x, R.const(4.0, "float32")),  # a product by 0.25: exact
                    R.divide(x, R.const(HUGE, "float32")),  # kept: 1/c would be a denormal
                    R.divide(x, y),  # kept: no constant
                    R.divide(w, R.const(6.0, "float64")),  # kept: float64
                )
                R.output(out)
            return out

    return relax.transform.LegalizeOps()(Module)


def _divisions(mod) -> list[str]:
    """The divisions left in ``mod``'s PrimFuncs, each as ``dtype / divisor``."""
    import tvm_ffi
    from tvm import tirx

    found: list[str] = []

    def note(division):
        divisor = str(division.b.value) if isinstance(division.b, tirx.FloatImm) else "tensor"
        found.append(f"{division.ty} / {divisor}")

    for _gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            tvm_ffi.structural_walk(func.body, [(tirx.Div, note)], order="post")
    return sorted(found)


def test_division_by_a_constant_becomes_a_product_of_its_reciprocal():
    before = _divisions_module()
    assert _divisions(before) == sorted(["float32 / 6.0", "float32 / 4.0", f"float32 / {HUGE}", "float32 / tensor", "float64 / 6.0"])
    after = fast_math()(before)
    assert _divisions(after) == sorted([f"float32 / {HUGE}", "float32 / tensor", "float64 / 6.0"])
    assert len(_divisions(before)) == 5  # the pass works on a copy
    y = np.linspace(0.5, 3.0, SWEEP.size).astype(np.float32)
    w = SWEEP.astype(np.float64)
    sixth, quarter, tiny, ratio, wide = _run(after, [SWEEP, y, w])
    exact = _run(before, [SWEEP, y, w])
    assert not np.array_equal(sixth, exact[0])  # a product ran, not the division
    ulp = np.spacing(np.abs(exact[0]))
    assert np.max(np.abs(sixth - exact[0]) / np.maximum(ulp, np.finfo(np.float32).smallest_subnormal)) <= 1.5
    for got, want in zip([quarter, tiny, ratio, wide], exact[1:], strict=True):
        np.testing.assert_array_equal(got, want)


def _hard_swish_model(path):
    """A conv followed by ONNX HardSwish (``x * relu6(x + 3) / 6``, MobileNetV3's activation)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("HardSwish", ["c"], ["y"])]
    initializers = {"w": rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.3, "b": rng.standard_normal(32).astype(np.float32)}
    return make_onnx(nodes, {"x": [1, 16, 20, 20]}, {"y": [1, 32, 20, 20]}, initializers, path)


@needs_objdump
def test_x86_hard_swish_build_divides_nothing_and_verifies(tmp_path):
    _hard_swish_model(tmp_path / "m.onnx")
    result = edgec.compile(edgec.load(tmp_path / "m.onnx"), "x86", tmp_path / "x86")
    check = result.manifest["verification"]
    assert check["status"] == "passed" and check["onnxruntime"]["within_tolerance"]
    code = disassembly(tmp_path / "x86" / "lib.so")
    assert "vdivps" not in code and "divss" not in code
    plain = edgec.compile(edgec.load(tmp_path / "m.onnx"), "x86", tmp_path / "plain", schedules=False)
    code = disassembly(tmp_path / "plain" / "lib.so")
    assert "divps" in code or "divss" in code  # without the rewrite the division is there (the check above can fail)
