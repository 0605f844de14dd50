"""The edgec command line, through click's CliRunner, plus one real subprocess run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

import edgec
from backbone import ATOL, RTOL, invoke
from edgec.core.artifact import load_artifact
from edgec.cli import cli
from edgec.runtimes.local import LocalRunner
from edgec.targets import PRESETS, resolve


pytestmark = pytest.mark.usefixtures("restore_logging")  # conftest.py: the CLI reconfigures logging


def assert_clean_error(result, *words: str) -> str:
    """Exit status 1, one 'Error: ...' line on stderr naming ``words``, nothing on stdout, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0]
    return errors[0]


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"edgec, version {edgec.__version__}"


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


def test_help_of_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("compile", "run", "inspect", "targets"):
        assert command in result.stdout
    paths = list(_commands(cli))
    assert {("compile",), ("run",), ("inspect",), ("targets",)} <= set(paths)
    for path in paths:
        result = invoke(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert f"Usage: edgec {' '.join(path)}" in result.stdout
    compile_help = invoke("compile", "--help").stdout
    for option in ("--target", "--input-shape", "--trust-pickle", "--no-verify", "--rtol", "--atol", "--json"):
        assert option in compile_help


def test_help_is_instant_no_heavy_imports():
    """`edgec --help` must not import torch or tvm (checked in a fresh interpreter)."""
    code = (
        "import sys; from edgec.cli import cli\n"
        "try:\n    cli(['--help'], prog_name='edgec')\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'tvm', 'onnx', 'onnxruntime') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def test_targets_table_and_json():
    result = invoke("targets")
    assert result.exit_code == 0
    for name in PRESETS:
        assert name in result.stdout
    result = invoke("targets", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == list(PRESETS)
    by_name = {row["name"]: row for row in rows}
    assert by_name["cortex-a7"]["tvm_target"] == resolve("cortex-a7").tvm_json
    assert by_name["cuda"]["tvm_target"] == {"kind": "cuda", "arch": "sm_80"}
    assert by_name["cuda"]["options"] == {"arch": "sm_80", "dtype": "float32"}
    assert by_name["x86"]["runs_here"] is True and by_name["cortex-a53"]["runs_here"] is False
    assert by_name["cortex-a53"]["toolchain"][0]["tool"] == "aarch64-linux-gnu-g++"


def test_inspect_table_and_json(saved_models):
    saved = saved_models["resnet"]
    result = invoke("inspect", saved.files["torchscript"], "--input-shape", "1,3,32,32")
    assert result.exit_code == 0, result.output
    assert "Conv" in result.stdout and "BatchNormalization" in result.stdout and "parameters" in result.stdout

    result = invoke("inspect", saved.files["onnx"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "onnx"
    params = sum(p.numel() for p in saved.module.parameters())
    # the graph's initializers hold the parameters plus BN running stats (2 per channel)
    bn_stats = sum(m.running_mean.numel() * 2 for m in saved.module.modules() if hasattr(m, "running_mean"))
    assert report["params"] == params + bn_stats
    assert report["macs"] > 0
    assert report["op_counts"]["Conv"] == 6
    conv_layers = [layer for layer in report["layers"] if layer["op"] == "Conv"]
    assert all(layer["params"] > 0 and layer["macs"] > 0 for layer in conv_layers)
    # the stem: 3x3 conv 3 -> 16 channels on 32x32, stride 1
    assert conv_layers[0]["macs"] == 16 * 32 * 32 * 3 * 3 * 3
    assert sum(layer["macs"] for layer in report["layers"]) == report["macs"]


@pytest.fixture(scope="module")
def cli_artifact(saved_models, tmp_path_factory):
    saved = saved_models["mlp"]
    output = tmp_path_factory.mktemp("cli") / "mlp_x86"
    result = invoke(
        "compile", saved.files["torchscript"], "--input-shape", "1,48", "-t", "x86", "-o", output, "--json"
    )
    return saved, output, result


def test_compile_json(cli_artifact):
    saved, output, result = cli_artifact
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["artifact"] == str(output)
    assert summary["target"]["preset"] == "x86"
    assert summary["verification"]["status"] == "passed"
    assert summary["inputs"] == [{"name": "x", "shape": [1, 48], "dtype": "float32"}]
    assert load_artifact(output).manifest["onnx"]["sha256"] == summary["onnx"]["sha256"]
    # progress went to stderr, so stdout is pure JSON
    assert "lower" in result.stderr and "build" in result.stderr


def test_compile_table(saved_models, tmp_path):
    saved = saved_models["mlp"]
    output = tmp_path / "mlp"
    result = invoke("compile", saved.files["onnx"], "-t", "x86", "-o", output)
    assert result.exit_code == 0, result.output
    assert str(output) in result.stdout and "vs onnxruntime" in result.stdout and "ok" in result.stdout
    assert (output / "lib.so").is_file()


def test_run_random(cli_artifact):
    _, output, _ = cli_artifact
    result = invoke("run", output, "--random", "--seed", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (row,) = report["outputs"]
    assert row["name"] == load_artifact(output).outputs[0]["name"]
    assert row["shape"] == [1, 10] and row["dtype"] == "float32"
    assert len(row["top5"]) == 5
    # the same seed gives the same numbers; a different seed different ones
    again = json.loads(invoke("run", output, "--random", "--seed", "3", "--json").stdout)
    other = json.loads(invoke("run", output, "--random", "--seed", "4", "--json").stdout)
    assert again["outputs"] == report["outputs"]
    assert other["outputs"] != report["outputs"]


def test_run_input_file(cli_artifact, tmp_path):
    saved, output, _ = cli_artifact
    x = np.random.default_rng(7).standard_normal((1, 48)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = invoke("run", output, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert result.exit_code == 0, result.output
    assert "y.npy" in result.stdout
    y = np.load(tmp_path / "y.npy")
    (want,) = LocalRunner(load_artifact(output)).run([x])
    np.testing.assert_array_equal(y, want)
    np.testing.assert_allclose(y, saved.torch_outputs(x), rtol=RTOL, atol=ATOL)

    # one .npz keyed by input name in, .npz keyed by output name out
    np.savez(tmp_path / "x.npz", x=x)
    result = invoke("run", output, "-i", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "y.npz") as archive:
        assert archive.files == [spec["name"] for spec in load_artifact(output).outputs]
        np.testing.assert_array_equal(archive[archive.files[0]], want)


def test_run_needs_input_or_random(cli_artifact, tmp_path):
    _, output, _ = cli_artifact
    assert_clean_error(invoke("run", output), "--input", "--random")
    np.save(tmp_path / "wrong.npy", np.zeros((1, 47), np.float32))
    assert_clean_error(invoke("run", output, "-i", tmp_path / "wrong.npy"), "(1, 48)", "(1, 47)")
    assert_clean_error(invoke("run", tmp_path / "nothing", "--random"), "does not exist")


def test_compile_bad_target(saved_models, tmp_path):
    result = invoke("compile", saved_models["mlp"].files["onnx"], "-t", "cortex-a9", "-o", tmp_path / "out")
    line = assert_clean_error(result, "unknown target 'cortex-a9'", "cortex-a7")
    assert result.stderr.startswith("Error:"), line  # refused before any stage starts
    assert not (tmp_path / "out").exists()


def test_compile_missing_file(tmp_path):
    result = invoke("compile", tmp_path / "missing.pt", "-t", "x86", "-o", tmp_path / "out")
    assert_clean_error(result, "missing.pt", "does not exist")
    assert not (tmp_path / "out").exists()


def test_compile_pickle_needs_flag(saved_models, tmp_path):
    saved = saved_models["mlp"]
    result = invoke("compile", saved.files["pickle"], "--input-shape", "1,48", "-t", "x86", "-o", tmp_path / "out")
    assert_clean_error(result, "--trust-pickle")


def test_verbose_logs_and_traceback(saved_models, tmp_path):
    result = invoke("-v", "inspect", saved_models["mlp"].files["onnx"], "--json")
    assert result.exit_code == 0, result.output
    assert "INFO edgec.frontend: loading" in result.stderr
    json.loads(result.stdout)  # logs do not pollute stdout

    quiet = invoke("inspect", saved_models["mlp"].files["onnx"], "--json")
    assert "INFO" not in quiet.stderr

    result = invoke("-vv", "compile", tmp_path / "missing.pt", "-t", "x86", "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "LoadError" in result.stderr


# --- one real process: the installed console script ---


def test_console_script_end_to_end(saved_models, tmp_path):
    script = Path(sys.executable).parent / "edgec"
    assert script.is_file(), f"console script not installed at {script}"
    saved = saved_models["mlp"]
    output = tmp_path / "mlp_x86"
    env = {**os.environ, "COLUMNS": "120"}

    done = subprocess.run(
        [str(script), "compile", str(saved.files["torchscript"]), "--input-shape", "1,48", "-t", "x86", "-o", str(output), "--json"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["verification"]["status"] == "passed"
    assert (output / "lib.so").is_file()

    x = np.random.default_rng(11).standard_normal((1, 48)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [str(script), "run", str(output), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"), "--json"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["written"] == str(tmp_path / "y.npy")
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), saved.torch_outputs(x), rtol=RTOL, atol=ATOL)

    done = subprocess.run(
        [str(script), "compile", str(tmp_path / "missing.onnx"), "-t", "x86"],
        capture_output=True, text=True, timeout=300, env=env, check=False, cwd=tmp_path,
    )
    assert done.returncode == 1
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert any(line.startswith("Error:") and "does not exist" in line for line in done.stderr.splitlines())
