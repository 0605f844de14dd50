"""edgec bench / profile / device commands against emulated ARM boards (edgec-agent under qemu-user).

What a user without hardware runs: `edgec device emulate -t cortex-a7`, then
`edgec bench/profile ARTIFACT --rpc 127.0.0.1:PORT` or through a tracker by
key. The board runs the target's real machine code (emulated), so outputs
must match the local reference; timings are never asserted, only the
profile's structure (one row per kernel of the manifest, with its calls).
Instruction counts are deterministic, so they are asserted: the same count
on every run and in every session, the kernels' sum within a few percent of
the whole model's, twice the pixels about twice the instructions.

Agents come from ~/.cache/edgec/agent (test_agent.py builds them first,
bounded; a cold build here takes minutes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import edgec
from edgec.cli import cli
from backbone import assert_profile_adds_up
from models import ProfileNet

BOARDS = {"cortex-a7": "armv7", "cortex-a53": "aarch64"}  # preset -> cpu_arch the board reports
QEMU = {"armv7": "qemu-arm-static", "aarch64": "qemu-aarch64-static"}
COUNTING_QEMU = {"armv7": "qemu-arm", "aarch64": "qemu-aarch64"}
SHAPE = (1, 3, 64, 64)  # ProfileNet: about 16 MMAC, each kernel far longer than the VM's per-call overhead under qemu
EDGEC = [sys.executable, "-m", "edgec.cli"]

pytestmark = pytest.mark.slow


def _require(preset: str) -> None:
    from edgec.targets.presets import PRESETS

    chain = PRESETS[preset].toolchain
    if shutil.which(chain.compiler) is None:
        pytest.skip(f"{chain.compiler} missing (apt-get install {chain.debian_package})")
    if shutil.which(QEMU[BOARDS[preset]]) is None:
        pytest.skip("qemu-user-static missing (apt-get install qemu-user-static)")
    if shutil.which(COUNTING_QEMU[BOARDS[preset]]) is None:
        pytest.skip("qemu-user missing (apt-get install qemu-user): it runs the counting boards")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """preset -> artifact directory of ProfileNet, compiled once per preset; "model" -> its TorchScript."""
    root = tmp_path_factory.mktemp("boards")
    torch.manual_seed(0)
    model_path = root / "net.pt"
    torch.jit.save(torch.jit.script(ProfileNet().eval()), str(model_path))
    built = {"model": model_path}
    for preset in BOARDS:
        _require(preset)
        built[preset] = edgec.compile(edgec.load(model_path, input_shape=SHAPE), preset, root / preset).artifact.path
    return built


@contextlib.contextmanager
def board(preset: str, *extra: str):
    from edgec.runtimes.agent_build import build_agent
    from edgec.runtimes.emulate import emulate

    agent = emulate(preset, agent=build_agent(preset), extra_args=extra, timeout=60)
    try:
        yield agent
    finally:
        agent.stop()


def invoke(*args: str) -> dict:
    done = CliRunner().invoke(cli, [*args, "--json"])
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


@pytest.mark.parametrize("preset", BOARDS)
def test_bench_and_profile_on_emulated_board(artifacts, preset, tmp_path):
    with board(preset) as agent:
        address = f"127.0.0.1:{agent.port}"
        bench = invoke("bench", str(artifacts[preset]), "--rpc", address, "--repeat", "3", "--warmup", "1")
        assert bench["device_info"]["agent"] == "edgec-agent"
        assert bench["device_info"]["cpu_arch"] == BOARDS[preset] and bench["emulated"] is True
        assert bench["check"]["ok"] is True and bench["check"]["max_abs"] < 1e-4
        html = tmp_path / "profile.html"
        data = invoke("profile", str(artifacts[preset]), "--rpc", address, "--repeat", "5", "--html", str(html))
        assert_profile_adds_up(data, edgec.load_artifact(artifacts[preset]).manifest)
        assert data["emulated"] is True and any("Conv" in node for row in data["rows"] for node in row["onnx_nodes"])
        assert "<table>" in html.read_text() and "instructions per inference" in html.read_text()
    counted = bench["instructions"]
    assert counted["cpu"] == preset and counted["other_threads"] == 0
    assert counted["deterministic"] and len(set(counted["runs"])) == 1
    # bench and profile: separate sessions (forked processes), the same count to the instruction
    assert data["instructions"]["per_inference"] == counted["per_inference"] == counted["runs"][0]
    assert counted["per_mac"] == pytest.approx(counted["per_inference"] / bench["macs"]) and bench["macs"] > 10_000_000
    assert 0.2 < counted["per_mac"] < 10  # vectorised kernels: a few instructions per MAC, not thousands
    rows = data["rows"]
    for row in rows:
        assert row["instructions"]["deterministic"] and row["instructions"]["total"] == row["instructions"]["per_call"] * row["calls"]
    kernels = sum(row["instructions"]["total"] for row in rows)
    assert data["instructions"]["kernels"] == kernels
    # the kernels are almost all of the work; the rest is the VM's (allocation, calls)
    assert 0.95 * counted["per_inference"] <= kernels <= counted["per_inference"]
    assert sum(row["instructions"]["percent"] for row in rows) == pytest.approx(100 * kernels / counted["per_inference"])
    convs = [row for row in rows if any("Conv" in node for node in row["onnx_nodes"])]
    assert convs and all(row["macs_per_call"] > 0 and row["instructions"]["per_mac"] > 0 for row in convs)


def test_twice_the_pixels_count_about_twice_the_instructions(artifacts, tmp_path):
    """ProfileNet at 64x128 against 64x64 on the same emulated cortex-a53: per kernel and whole."""
    preset = "cortex-a53"
    wide = edgec.compile(edgec.load(artifacts["model"], input_shape=(1, 3, 64, 128)), preset, tmp_path / "wide").artifact.path
    with board(preset) as agent:
        address = f"127.0.0.1:{agent.port}"
        small, large = (invoke("profile", str(path), "--rpc", address, "--repeat", "1") for path in (artifacts[preset], wide))
    assert large["instructions"]["per_inference"] == pytest.approx(2 * small["instructions"]["per_inference"], rel=0.05)
    by_nodes = {tuple(row["onnx_nodes"]): row for row in small["rows"] if row["onnx_nodes"]}
    for row in large["rows"]:
        if any("Conv" in node for node in row["onnx_nodes"]):
            before = by_nodes[tuple(row["onnx_nodes"])]["instructions"]["total"]
            assert row["instructions"]["total"] == pytest.approx(2 * before, rel=0.05), row["kernel"]  # 1.996-2.005x measured


def test_tracker_routes_keys_to_both_emulated_boards(artifacts):
    from edgec.runtimes.emulate import free_port

    port = free_port()
    tracker = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1), "--silent"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_listening(port, tracker)
        address = f"127.0.0.1:{port}"
        with board("cortex-a7", "--tracker", address, "--key", "a7"), board("cortex-a53", "--tracker", address, "--key", "a53"):
            _wait_registered(port, {"a7", "a53"})
            for preset, key in (("cortex-a7", "a7"), ("cortex-a53", "a53")):
                data = invoke("bench", str(artifacts[preset]), "--tracker", address, "--key", key, "--repeat", "2", "--warmup", "0")
                assert data["device_info"]["cpu_arch"] == BOARDS[preset] and data["check"]["ok"] is True
            _wait_registered(port, {"a7"})  # the a7 board offers itself again after its session
            wrong = CliRunner().invoke(cli, ["bench", str(artifacts["cortex-a53"]), "--tracker", address, "--key", "a7"])
            assert wrong.exit_code == 1 and "compiled for cortex-a53 (aarch64)" in wrong.output and "armv7" in wrong.output
    finally:
        os.killpg(tracker.pid, signal.SIGTERM)
        tracker.wait(10)


def _wait_listening(port: int, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the tracker exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            return
        time.sleep(0.2)
    pytest.fail(f"nothing listens on {port} after {seconds:g} s")


def _wait_registered(port: int, keys: set[str], seconds: float = 60) -> None:
    from tvm import rpc

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        queue = rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"]
        if all(queue.get(key, {}).get("free", 0) > 0 for key in keys):
            return
        time.sleep(0.5)
    pytest.fail(f"boards {sorted(keys)} not free at the tracker after {seconds:g} s")


def test_device_emulate_command_serves_until_terminated(artifacts):
    """`edgec device emulate` as a user runs it: a real process, stopped with SIGTERM, leaving no qemu behind."""
    import psutil

    from edgec.runtimes.emulate import free_port

    port = free_port()
    process = subprocess.Popen(
        [*EDGEC, "device", "emulate", "-t", "cortex-a7", "--port", str(port), "--no-count"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        _wait_listening(port, process)
        children = psutil.Process(process.pid).children(recursive=True)
        assert any("qemu-arm-static" in " ".join(child.cmdline()) for child in children)  # --no-count: no plugin
        data = invoke("bench", str(artifacts["cortex-a7"]), "--rpc", f"127.0.0.1:{port}", "--repeat", "1", "--warmup", "0")
        assert data["check"]["ok"] is True and data["emulated"] is True
        assert data["instructions"] is None and data["device_info"]["counts_instructions"] is False
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"emulated cortex-a7 board on 127.0.0.1:{port};" in err and "stopping" in err
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert not [child for child in children if child.is_running()]  # qemu and the agent's sessions are gone


def test_device_commands_reject_bad_options(tmp_path):
    runner = CliRunner()
    done = runner.invoke(cli, ["device", "emulate", "-t", "cortex-a7", "--key", "a7"])
    assert done.exit_code == 1 and "--tracker" in done.output
    done = runner.invoke(cli, ["device", "emulate", "-t", "x86"])
    assert done.exit_code == 2 and "cortex-a7" in done.output
    done = runner.invoke(cli, ["device", "build-agent", "-t", "cuda", "-o", str(tmp_path / "agent")])
    assert done.exit_code == 1 and "CPU code only" in done.output
    assert not (tmp_path / "agent").exists()


@pytest.mark.parametrize("preset", BOARDS)
def test_build_agent_command_writes_one_file(preset, tmp_path):
    _require(preset)
    done = CliRunner().invoke(cli, ["device", "build-agent", "-t", preset, "-o", str(tmp_path)])
    assert done.exit_code == 0, done.output
    binary = tmp_path / "edgec-agent"
    header = binary.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == {"armv7": 40, "aarch64": 183}[BOARDS[preset]]
    assert os.access(binary, os.X_OK) and str(binary) in done.output
