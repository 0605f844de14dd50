"""The pins of constraints.txt hold (read from the file, not repeated here), and the reason
for the tvm-ffi pin stays fixed.

docs/architecture.md (Pins): with apache-tvm-ffi 0.1.15.x, ``tvm.ir.save_json`` segfaults,
which kills MetaSchedule tuning. The round trip runs in a subprocess so that a
segfault fails this test instead of killing pytest.
"""

from __future__ import annotations

import importlib.metadata
import re
import signal
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
PYPROJECT = CONSTRAINTS.with_name("pyproject.toml")

ROUND_TRIP = textwrap.dedent(
    """
    import json
    import numpy as np
    import onnx_ir as ir
    import tvm
    import edgec
    from edgec.lower import to_relax

    # a tiny Conv -> Relu -> GlobalAveragePool model, with a weight constant
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", shape=ir.Shape([1, 3, 8, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(name="w", const_value=ir.tensor(rng.standard_normal((4, 3, 3, 3)).astype(np.float32)))
    conv = ir.Node("", "Conv", [x, weight], attributes=[ir.AttrInt64s("pads", [1, 1, 1, 1])], name="conv")
    relu = ir.Node("", "Relu", conv.outputs, name="relu")
    pool = ir.Node("", "GlobalAveragePool", relu.outputs, name="pool")
    pool.outputs[0].name = "y"
    graph = ir.Graph([x], pool.outputs, nodes=[conv, relu, pool], initializers=[weight], opset_imports={"": 17})
    mod = to_relax(edgec.from_onnx_ir(ir.Model(graph, ir_version=8)).graph)
    assert isinstance(mod, tvm.IRModule), type(mod)

    text = tvm.ir.save_json(mod)
    assert json.loads(text)["nodes"], "empty JSON"
    restored = tvm.ir.load_json(text)
    tvm.ir.assert_structural_equal(restored, mod, map_free_vars=True)
    assert tvm.ir.save_json(restored) == text
    print("ROUND_TRIP_OK", len(text))
    """
)


def test_save_json_round_trips_a_relax_module():
    done = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP], capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        pytest.fail(f"tvm.ir.save_json/load_json killed the interpreter with {name} (the tvm-ffi 0.1.15 bug?)")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ROUND_TRIP_OK" in done.stdout


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"constraints.txt line {line!r} is not an exact NAME==VERSION pin"
        pins[match.group(1)] = match.group(2)
    return pins


def test_tvm_ffi_pin_avoids_the_save_json_segfault():
    assert not _pins()["apache-tvm-ffi"].startswith("0.1.15")


def _required() -> set[str]:
    """What `make setup` installs: pyproject's dependencies and its dev extra (the other
    extras, peers and cuda, are optional; their pins apply only where they are installed)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    names = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return {re.split(r"[<>=!~\[; ]", name, maxsplit=1)[0] for name in names}


def test_every_dependency_is_pinned():
    assert _required() <= set(_pins()), f"unpinned: {sorted(_required() - set(_pins()))}"


@pytest.mark.parametrize("name", sorted(_pins()))
def test_installed_version_matches_pin(name):
    pinned = _pins()[name]
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        if name in _required():
            pytest.fail(f"{name}=={pinned} is pinned in constraints.txt but not installed")
        pytest.skip(f"{name} belongs to an optional extra that is not installed here")
    # a local version label (torch's "+cpu") matches a pin without one, as in pip
    public = installed.split("+", 1)[0]
    assert public == pinned, f"{name}: installed {installed}, constraints.txt pins {pinned}"


def test_imported_tvm_is_the_pinned_one():
    import tvm
    import tvm_ffi

    pins = _pins()
    assert tvm.__version__ == pins["apache-tvm"]
    assert tvm_ffi.__version__ == pins["apache-tvm-ffi"]
