"""Reliability: bad files, bad options, signals, races, broken artifacts and devices (issue 15).

Each test reproduces one fault found by trying edgec as a hostile but
realistic user would, and checks what edgec does now: no code runs from a
model without --trust-pickle, no data is lost, every failure is one
``Error:`` line naming the file or flag, and every build is checked against
a reference that shares no code with it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec
import edgec.core.artifact
import edgec.lower
from backbone import invoke, leftovers, make_onnx, one_error_line, tree_bytes
from edgec.core.artifact import MANIFEST, load_artifact, staging
from edgec.cli import cli
from edgec.core.errors import ArtifactError, InputDataError, LoadError, PassError
from edgec.passes import PackBlockSparsePass

EDGEC = [sys.executable, "-m", "edgec.cli"]


# --------------------------------------------------------------------------
# 1. No input format runs code without --trust-pickle
# --------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs a shell command (what a malicious sample_inputs pickle does)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def evil_pt2(tmp_path_factory) -> tuple[Path, Path]:
    """A valid torch.export archive whose sample_inputs pickle runs ``touch <marker>``."""
    import torch

    root = tmp_path_factory.mktemp("evil")
    good = root / "good.pt2"
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    torch.export.save(torch.export.export(module, (torch.randn(1, 3, 8, 8),)), str(good))
    marker = root / "pwned"
    payload = io.BytesIO()
    torch.save(((_Payload(f"touch {marker}"),), {}), payload)
    evil = root / "evil.pt2"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(evil, "w") as target:
        replaced = 0
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("sample_inputs/model.pt"):
                data, replaced = payload.getvalue(), replaced + 1
            target.writestr(info, data)
    assert replaced == 1
    return evil, marker


@pytest.mark.parametrize("command", ["inspect", "compile"])
def test_malicious_pt2_runs_no_code(evil_pt2, command, tmp_path):
    evil, marker = evil_pt2
    args = [command, evil] + (["-t", "x86", "-o", tmp_path / "out"] if command == "compile" else [])
    line = one_error_line(invoke(*args), "evil.pt2", "run code", "--trust-pickle")
    assert "posix.system" in line or "os.system" in line  # what the pickle wanted to call
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_malicious_pt2_through_the_python_api(evil_pt2):
    evil, marker = evil_pt2
    with pytest.raises(LoadError, match="--trust-pickle"):
        edgec.load(evil)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the guard is undone after the load


def test_pt2_with_pickled_python_objects_is_refused(evil_pt2, tmp_path):
    """Opaque and script-object constants are unpickled with pickle itself (weights_only cannot apply)."""
    evil, marker = evil_pt2
    opaque = tmp_path / "opaque.pt2"
    with zipfile.ZipFile(evil) as source, zipfile.ZipFile(opaque, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info.filename))
        prefix = source.namelist()[0].split("/")[0]
        target.writestr(f"{prefix}/data/constants/opaque_obj_0", b"\x80\x04N.")
    line = one_error_line(invoke("inspect", opaque), "opaque.pt2", "opaque_obj_0", "--trust-pickle")
    assert "run code" in line and not marker.exists()


# --------------------------------------------------------------------------
# 2. Only what edgec wrote is ever replaced
# --------------------------------------------------------------------------


def test_directory_with_a_foreign_manifest_is_not_replaced(tmp_path, saved_models):
    """The issue's repro: w/manifest.json holding {} and w/src/a.js; `edgec compile -o w` deleted w/src."""
    work = tmp_path / "w"
    (work / "src").mkdir(parents=True)
    (work / MANIFEST).write_text("{}")
    (work / "src" / "a.js").write_text("x")
    before = tree_bytes(work)
    one_error_line(invoke("compile", saved_models["mlp"].files["onnx"], "-t", "x86", "-o", work), "not an edgec artifact", str(work))
    assert tree_bytes(work) == before
    assert leftovers(tmp_path) == []


def test_artifact_holding_user_files_is_not_replaced(tmp_path, artifacts, saved_models):
    output = tmp_path / "model_x86"
    shutil.copytree(artifacts.get("mlp", "x86").artifact.path, output)
    (output / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="notes.txt"):
        edgec.compile(edgec.load(saved_models["mlp"].files["onnx"]), "x86", output)
    assert (output / "notes.txt").read_text() == "mine" and (output / "lib.so").is_file()


def test_format_1_artifact_is_still_recognised_and_replaced(tmp_path, artifacts, saved_models):
    """Artifacts written before the generator marker (format 1, edgec_version) stay replaceable and loadable."""
    output = tmp_path / "model_x86"
    shutil.copytree(artifacts.get("mlp", "x86").artifact.path, output)
    manifest = json.loads((output / MANIFEST).read_text())
    for key in ("generator", "sha256"):
        manifest.pop(key)
    manifest["format"] = 1
    (output / MANIFEST).write_text(json.dumps(manifest))
    assert load_artifact(output).manifest["format"] == 1
    result = edgec.compile(edgec.load(saved_models["mlp"].files["onnx"]), "x86", output)
    assert result.manifest["generator"] == "edgec" and result.manifest["format"] == 2
    assert set(result.manifest["sha256"]) == set(result.manifest["files"])


# --------------------------------------------------------------------------
# 3. A server survives a crashing upload
# --------------------------------------------------------------------------


def test_serve_survives_a_crashing_upload(artifacts):
    """A truncated lib.so kills the session's worker with SIGBUS; the next client must still be served."""
    from tvm import rpc

    from edgec.runtimes.emulate import free_port
    from edgec.runtimes.serve import start_server
    from edgec.runtimes.session import _bounded

    lib = artifacts.get("mlp", "x86").artifact.lib.read_bytes()
    server = start_server("127.0.0.1", free_port())
    try:
        first = rpc.connect("127.0.0.1", server.port, session_timeout=0)
        first.upload(bytearray(lib[: len(lib) // 3]), "truncated.so")
        with pytest.raises(Exception):  # noqa: B017 - TVM's error for a session whose worker died
            first.load_module("truncated.so")
        del first

        def second_client() -> str:
            session = rpc.connect("127.0.0.1", server.port, session_timeout=0)
            session.upload(bytearray(lib), "good.so")
            session.load_module("good.so")
            return session.get_function("edgec.device.info")()

        info = json.loads(_bounded(second_client, 60, "the client after the crash"))
        assert info["agent"] == "edgec-python-server"
        assert server.proc.is_alive()
    finally:
        server.terminate()


def test_serve_on_a_busy_port_is_one_line():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        one_error_line(invoke("device", "serve", "--port", port), f"port {port}", "in use", "--port")


# --------------------------------------------------------------------------
# 4. SIGTERM cleans up as Ctrl-C does
# --------------------------------------------------------------------------


def test_sigterm_during_compile_leaves_nothing(tmp_path, saved_models):
    """Killed while linking (TVM's temporary lib0.o directory exists): no .NAME.tmp-*, no temporary directory."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "out"
    env = dict(os.environ, TMPDIR=str(scratch))
    model = saved_models["mobilenet"].files["onnx"]
    process = subprocess.Popen(
        [*EDGEC, "compile", str(model), "-t", "x86", "-o", str(out / "mb"), "--no-verify"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    seen: list[str] = []
    while time.monotonic() < deadline and process.poll() is None:
        seen = [path.name for path in scratch.rglob("*.o")]
        if seen:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    if not seen:
        pytest.fail(f"the compile never reached linking (exit {process.returncode}): {stderr[-500:]}")
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "SIGTERM" in stderr
    assert list(scratch.iterdir()) == []  # TVM's lib0.o directory is gone
    assert not out.exists() or list(out.iterdir()) == []  # no .mb.tmp-*, no half artifact


# --------------------------------------------------------------------------
# 5-6. Broken artifacts: one line naming the file, before anything dlopens lib.so
# --------------------------------------------------------------------------


@pytest.fixture
def artifact_copy(artifacts, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(artifacts.get("mlp", "x86").artifact.path, copy)
    return copy


def _drop_hashes(artifact: Path) -> None:
    """Make it a format-1 manifest (no sha256): the ELF checks alone must catch damage."""
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest.pop("sha256")
    manifest.pop("generator")
    manifest["format"] = 1
    (artifact / MANIFEST).write_text(json.dumps(manifest))


def test_swapped_lib_so_is_refused(artifact_copy, artifacts):
    """A lib.so from another model ran and exited 0 with that model's outputs."""
    shutil.copy(artifacts.get("vgg", "x86").artifact.lib, artifact_copy / "lib.so")
    line = one_error_line(invoke("run", artifact_copy, "--random"), "lib.so", "sha256", "recompile")
    assert str(artifact_copy) in line
    for command in ("bench", "profile"):
        one_error_line(invoke(command, artifact_copy, "--local"), "lib.so", "sha256")


@pytest.mark.parametrize("hashes", [True, False], ids=["format2", "format1-no-hashes"])
def test_truncated_lib_so_is_an_error_not_a_bus_error(artifact_copy, hashes):
    lib = artifact_copy / "lib.so"
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    if not hashes:
        _drop_hashes(artifact_copy)
    done = subprocess.run([*EDGEC, "run", str(artifact_copy), "--random"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # was 135 (SIGBUS), no message
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "lib.so" in errors[0]
    assert ("sha256" if hashes else "truncated") in errors[0]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (lambda lib: os.urandom(len(lib)), ("not an ELF shared object",)),
        (lambda lib: lib[:18] + (183).to_bytes(2, "little") + lib[20:], ("AArch64", "x86_64")),  # foreign CPU
    ],
    ids=["garbage", "foreign-arch"],
)
def test_garbage_or_foreign_lib_so(artifact_copy, content, words):
    lib = artifact_copy / "lib.so"
    lib.write_bytes(content(lib.read_bytes()))
    _drop_hashes(artifact_copy)
    one_error_line(invoke("run", artifact_copy, "--random"), "lib.so", *words)


@pytest.mark.parametrize(
    ("manifest", "words"),
    [
        ("{}", ("not an edgec artifact",)),
        ("[]", ("not an edgec artifact",)),
        ('"edgec"', ("not an edgec artifact",)),
        (lambda m: {k: v for k, v in m.items() if k != "inputs"}, ("'inputs'",)),
        (lambda m: {**m, "target": {**m["target"], "cpu_arch": 7}}, ("target.cpu_arch", "str")),
        (lambda m: {**m, "inputs": [{"name": "x", "shape": "1x48", "dtype": "float32"}]}, ("inputs[0].shape",)),
        (lambda m: {**m, "files": ["../../etc/passwd", "lib.so"]}, ("'files'",)),
        (lambda m: {**m, "format": 99}, ("format 99",)),
        (lambda m: {k: v for k, v in m.items() if k != "sha256"}, ("'sha256'",)),
    ],
    ids=["empty-object", "list", "string", "no-inputs", "cpu-arch-type", "shape-type", "files", "future-format", "no-hashes"],
)
def test_bad_manifest_is_one_line(artifact_copy, manifest, words):
    path = artifact_copy / MANIFEST
    if callable(manifest):
        manifest = json.dumps(manifest(json.loads(path.read_text())))
    path.write_text(manifest)
    for command in (["run", artifact_copy, "--random"], ["bench", artifact_copy, "--local"]):
        one_error_line(invoke(*command), *words)


# --------------------------------------------------------------------------
# 5. Checks the compiled code does not make: Gather indices, NaN inputs
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gather_artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gather")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0, name="lookup")], "g",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4])],
        [numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), root / "gather.onnx")
    return edgec.compile(edgec.load(root / "gather.onnx"), "x86", root / "gather_x86").artifact.path


def test_out_of_range_gather_indices_are_refused(gather_artifact, tmp_path):
    """They segfaulted or read other memory (ONNX Runtime raises)."""
    assert load_artifact(gather_artifact).inputs[0]["index_range"] == [-10, 9]
    np.save(tmp_path / "bad.npy", np.array([[0, 5, 1_000_000]], np.int64))
    np.save(tmp_path / "good.npy", np.array([[0, -10, 9]], np.int64))
    for command in ("run", "bench"):
        one_error_line(invoke(command, gather_artifact, "-i", tmp_path / "bad.npy"), "'idx'", "[-10, 9]", "1000000")
    result = invoke("run", gather_artifact, "-i", tmp_path / "good.npy", "-o", tmp_path / "y.npy", "--json")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy")[0], np.arange(40, dtype=np.float32).reshape(10, 4)[[0, -10, 9]])
    from edgec.runtimes.local import LocalRunner

    with pytest.raises(InputDataError, match="Gather"):
        LocalRunner(load_artifact(gather_artifact)).run([np.array([[10, 0, 0]], np.int64)])


def test_nan_input_is_warned_about(artifact_copy, tmp_path, caplog):
    np.save(tmp_path / "nan.npy", np.full((1, 48), np.nan, np.float32))
    result = invoke("run", artifact_copy, "-i", tmp_path / "nan.npy")
    assert result.exit_code == 0
    assert "NaN/Inf" in result.stderr and "48" in result.stderr


# --------------------------------------------------------------------------
# 7-8. Bad options: one line naming the flag, and no small lies
# --------------------------------------------------------------------------


def test_output_next_to_a_file_or_unwritable(tmp_path, saved_models, monkeypatch):
    model = saved_models["mlp"].files["onnx"]
    (tmp_path / "afile.txt").write_text("")
    one_error_line(invoke("compile", model, "-t", "x86", "-o", tmp_path / "afile.txt" / "sub"), "afile.txt", "is a file")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(edgec.core.artifact.tempfile, "mkdtemp", read_only)  # as root, chmod cannot make a directory read-only
    one_error_line(invoke("compile", model, "-t", "x86", "-o", tmp_path / "ro" / "out"), "Permission denied", "-o")


def test_input_shape_larger_than_memory_is_refused_with_its_size(saved_models):
    """--input-shape 1,3,100000,100000 was a 120 GB allocation and a traceback."""
    line = one_error_line(invoke("inspect", saved_models["mlp"].files["torchscript"], "--input-shape", "1,100000000000"), "--input-shape")
    assert "372.5 GiB" in line and "memory" in line  # 1e11 float32 values


def test_input_shape_larger_than_memory_onnx(tmp_path):
    make_onnx(
        [helper.make_node("Relu", ["x"], ["y"])], {"x": ["n", 3, "h", "w"]}, {"y": ["n", 3, "h", "w"]}, {}, tmp_path / "dyn.onnx"
    )
    one_error_line(invoke("inspect", tmp_path / "dyn.onnx", "--input-shape", "1,3,100000,100000"), "111.8 GiB", "memory")


def test_torchscript_with_a_wrong_shape_says_why_and_keeps_stdout_clean(saved_models):
    """The exporter printed 24 lines of torch IR on stdout (from C++), also under --json."""
    path = saved_models["resnet"].files["torchscript"]
    done = subprocess.run(
        [*EDGEC, "compile", str(path), "-t", "x86", "--input-shape", "1,3,32", "--json"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr and "graph(" not in done.stderr
    assert "1,3,32" in errors[0] and "--input-shape" in errors[0] and "channels" in errors[0]  # PyTorch's own reason


def test_run_output_is_written_where_it_says(artifact_copy, tmp_path):
    """`run -o DIR` wrote DIR.npy and said DIR."""
    (tmp_path / "adir").mkdir()
    one_error_line(invoke("run", artifact_copy, "--random", "-o", tmp_path / "adir"), "is a directory")
    one_error_line(invoke("run", artifact_copy, "--random", "-o", tmp_path / "out"), ".npy", ".npz")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adir", "copy"]
    result = invoke("run", artifact_copy, "--random", "-o", tmp_path / "y.npy")
    assert result.exit_code == 0 and (tmp_path / "y.npy").is_file()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--rpc", "127.0.0.1:99999"], ("99999", "1-65535")),
        (["--rpc", "127.0.0.1:0"], ("port 0",)),
        (["--tracker", "127.0.0.1:70000", "--key", "a7"], ("70000",)),
    ],
)
def test_bad_device_addresses(artifact_copy, args, words):
    one_error_line(invoke("bench", artifact_copy, *args), *words)


@pytest.mark.parametrize("value", ["-5", "0"])
def test_negative_timeout_is_refused(artifact_copy, value):
    result = invoke("bench", artifact_copy, "--rpc", "127.0.0.1:9", "--timeout", value)
    assert result.exit_code == 2 and "--timeout" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("fuse-filters:exclude=typo", ("exclude='typo'",)),
        ("fuse-filters:layer_ratios=typo@0.3", ("layer_ratios='typo'",)),
        ("block-sparse:layers=typo", ("layers='typo'",)),
        ("binary:exclude=typo", ("exclude='typo'",)),
        ("ternary:exclude=typo", ("exclude='typo'",)),
    ],
)
def test_pass_options_naming_missing_nodes(saved_models, tmp_path, spec, words):
    """They were ignored silently."""
    line = one_error_line(invoke("compile", saved_models["vgg"].files["onnx"], "-t", "x86", "-p", spec, "-o", tmp_path / "o"), *words)
    assert "no node" in line and "edgec inspect" in line
    assert not (tmp_path / "o").exists()


def test_pass_option_suggests_the_close_name():
    model = make_onnx(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="features.conv1")], {"x": [1, 4, 4, 4]}, {"y": [1, 8, 4, 4]},
        {"w": np.ones((8, 4, 1, 1), np.float32)},
    )  # fmt: skip
    wrapped = edgec.from_onnx_ir(model)
    with pytest.raises(PassError, match="did you mean 'features.conv1'"):
        edgec.apply(wrapped, [PackBlockSparsePass(layers=("features.conv2",))])


def test_bench_does_not_time_code_that_failed_its_check(artifact_copy, monkeypatch):
    import edgec.runtimes.bench as bench_module

    timed: list[str] = []
    real_warm_up = bench_module.warm_up
    monkeypatch.setattr(bench_module, "warm_up", lambda *args: timed.append("warm-up") or real_warm_up(*args))
    real_check = bench_module.reference_check

    def wrong(artifact, inputs, outputs, *tolerances):
        return real_check(artifact, inputs, [output + 1.0 for output in outputs], *tolerances)

    monkeypatch.setattr(bench_module, "reference_check", wrong)
    line = one_error_line(invoke("bench", artifact_copy, "--local"), "differ", "not timed")
    assert "element" in line
    assert timed == []


def test_racing_compiles_on_one_output(tmp_path, saved_models):
    """Two edgec.compile calls racing on one output: the loser raised a raw OSError (ENOTEMPTY)."""
    output = tmp_path / "out"
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def stage(index: int) -> None:
        try:
            for round_ in range(10):
                with staging(output) as directory:
                    (directory / "lib.so").write_bytes(f"{index}-{round_}".encode())
                    edgec.core.artifact.write_manifest(directory, {"generator": "edgec", "format": 2, "files": ["lib.so"]})
                    if round_ == 0:
                        barrier.wait(30)
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=stage, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert sorted(path.name for path in output.iterdir()) == ["lib.so", MANIFEST]
    assert leftovers(tmp_path) == []
    # and two real compiles through the Python API, in two processes, at once
    script = "import sys, edgec; edgec.compile(edgec.load(sys.argv[1]), 'x86', sys.argv[2])"
    model = saved_models["mlp"].files["onnx"]
    racers = [
        subprocess.Popen([sys.executable, "-c", script, str(model), str(tmp_path / "real")], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outcomes = [(racer.wait(600), racer.stderr.read()) for racer in racers]
    assert [code for code, _ in outcomes] == [0, 0], [text[-800:] for _, text in outcomes]
    assert load_artifact(tmp_path / "real").manifest["generator"] == "edgec"
    assert leftovers(tmp_path) == []
