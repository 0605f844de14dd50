"""edgec-agent, the native TVM RPC server: cross-built, run under qemu-user, driven from x86 Python.

For cortex-a7 (armv7) and cortex-a53 (aarch64): the agent binary (single
file, stripped, exporting TVM's C API to lib.so), its CLI, and over RPC:
upload / load_module / Relax VM run equal to ONNX Runtime (1e-4), the VM and
per-kernel time evaluators, listdir / download / remove, a second session
after the first ends, key checks, tracker registration, and a clean stop.

Building an agent takes minutes on two cores the first time (cached in
~/.cache/edgec/agent after): those tests are marked ``slow`` and every build
is bounded by AGENT_BUILD_TIMEOUT; every network wait is bounded too.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgec.core.errors import AgentBuildError, EmulatorError

import models  # tests/models.py (conftest puts tests/ on sys.path)

PRESETS = {  # preset -> (cpu_arch, uname machine under qemu)
    "cortex-a7": ("armv7", "armv7l"),
    "cortex-a53": ("aarch64", "aarch64"),
}
QEMU = {"armv7": "qemu-arm-static", "aarch64": "qemu-aarch64-static"}
AGENT_BUILD_TIMEOUT = float(os.environ.get("EDGEC_AGENT_BUILD_TIMEOUT", "1800"))
RPC_TIMEOUT = 120.0  # one RPC step under emulation (upload, load, run, timing)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
PYTHON = sys.executable


def within(seconds: float, call, *args):
    """``call(*args)`` in a daemon thread; fail the test if it takes longer than ``seconds``."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = call(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised below
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(call, '__name__', call)} took longer than {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def require_tools(preset: str) -> None:
    from edgec.targets.presets import PRESETS as ALL

    chain = ALL[preset].toolchain
    if shutil.which(chain.compiler) is None:
        pytest.skip(f"{chain.compiler} missing (apt-get install {chain.debian_package})")
    if shutil.which(QEMU[ALL[preset].cpu_arch]) is None:
        pytest.skip("qemu-user-static missing (apt-get install qemu-user-static)")


@pytest.fixture(scope="session")
def agent_binary():
    """``agent_binary(preset)`` -> the agent's path, built at most once per session, in bounded time."""
    built: dict[str, Path] = {}

    def get(preset: str) -> Path:
        require_tools(preset)
        if preset not in built:
            code = f"from edgec.runtimes.agent_build import build_agent; print(build_agent({preset!r}))"
            process = subprocess.Popen([PYTHON, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            try:
                out, err = process.communicate(timeout=AGENT_BUILD_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                pytest.fail(f"building the agent for {preset} took longer than {AGENT_BUILD_TIMEOUT:g} s")
            assert process.returncode == 0, err[-3000:]
            built[preset] = Path(out.strip().splitlines()[-1])
        return built[preset]

    return get


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory):
    """``tiny_artifacts(preset)`` -> artifact dir of the tiny MobileNetV2, compiled once per preset."""
    import torch

    import edgec

    root = tmp_path_factory.mktemp("agent_models")
    model_path = root / "tiny.pt"
    torch.jit.save(torch.jit.script(models.build("mobilenet")), str(model_path))
    compiled: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in compiled:
            model = edgec.load(model_path, input_shape=models.IMAGE_SHAPE)
            compiled[preset] = edgec.compile(model, preset, root / preset).artifact.path
        return compiled[preset]

    return get


@contextlib.contextmanager
def running_agent(preset: str, binary: Path, *extra: str):
    from edgec.runtimes.emulate import emulate

    agent = emulate(preset, agent=binary, extra_args=extra, timeout=60)
    try:
        yield agent
    finally:
        agent.stop()
        with pytest.raises(ProcessLookupError):  # nothing of the agent's process group is left
            os.killpg(agent.process.pid, 0)


def connect(agent, key: str = ""):
    from tvm import rpc

    return within(30, lambda: rpc.connect(agent.host, agent.port, key=key))


def workdir_of(agent) -> Path:
    line = next(line for line in agent.log().splitlines() if " listening on " in line)
    return Path(line.rsplit("(workdir ", 1)[1].rstrip(")"))


# ---- the binary and its command line --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_agent_binary_is_one_stripped_file_exporting_tvm_api(agent_binary, preset):
    from edgec.runtimes.agent_build import build_agent
    from edgec.targets.presets import PRESETS as ALL

    binary = agent_binary(preset)
    header = binary.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == {"armv7": 40, "aarch64": 183}[PRESETS[preset][0]]  # EM_ARM, EM_AARCH64
    assert binary.stat().st_size < 8 * 2**20
    triple = ALL[preset].toolchain.compiler.removesuffix("-g++")
    sections = subprocess.run([f"{triple}-readelf", "-S", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    assert ".symtab" not in sections  # stripped
    assert "libstdc++" not in sections  # C++ runtime linked in; glibc stays dynamic for dlopen
    symbols = subprocess.run([f"{triple}-nm", "-D", "--defined-only", str(binary)], capture_output=True, text=True, check=True).stdout
    for name in ("TVMFFIErrorSetRaisedFromCStrParts", "TVMBackendAllocWorkspace", "TVMBackendParallelLaunch"):
        assert f" {name}" in symbols, f"{name} not exported to lib.so"
    start = time.monotonic()
    assert build_agent(preset) == binary  # cached: no rebuild
    assert time.monotonic() - start < 30


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_agent_cli(agent_binary, preset):
    from edgec.runtimes.emulate import EMULATORS

    cpu_arch = PRESETS[preset][0]
    emulator = EMULATORS[cpu_arch]
    command = [emulator.qemu, "-L", emulator.sysroot, str(agent_binary(preset))]
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith(f"edgec-agent 0.1.0 ({cpu_arch}")
    usage = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "--tracker" in usage.stdout and "--workdir" in usage.stdout
    bad = subprocess.run([*command, "--bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
    # a non-loopback address gets a warning (192.0.2.1, TEST-NET-1, is not ours: binding fails, nothing listens)
    public = subprocess.run([*command, "--host", "192.0.2.1"], capture_output=True, text=True, timeout=60)
    assert public.returncode == 1 and "RPC runs uploaded code" in public.stderr


# ---- over RPC ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_emulated_agent_runs_model_like_onnxruntime(agent_binary, tiny_artifacts, preset):
    import onnxruntime

    cpu_arch, machine = PRESETS[preset]
    binary = agent_binary(preset)
    artifact = tiny_artifacts(preset)
    manifest = json.loads((artifact / "manifest.json").read_text())
    x = models.example_input("mobilenet").numpy()
    session = onnxruntime.InferenceSession(str(artifact / "model.onnx"))
    want = session.run(None, {session.get_inputs()[0].name: x})[0]

    with running_agent(preset, binary) as agent:
        rpc_session_checks(agent, artifact, manifest, x, want, cpu_arch, machine)
        gc.collect()  # the session ends when its last reference (remote, devices, modules) goes
        # the agent keeps serving after a client leaves
        again = connect(agent)
        assert json.loads(within(RPC_TIMEOUT, again.get_function("edgec.device.info")))["cpu_arch"] == cpu_arch
        del again
        workdir = workdir_of(agent)
        assert workdir.is_dir()
    assert not workdir.exists()  # the default temp workdir goes away with the agent


def rpc_session_checks(agent, artifact: Path, manifest: dict, x: np.ndarray, want: np.ndarray, cpu_arch: str, machine: str) -> None:
    """One session: device info, upload, load, VM run vs ORT, VM and kernel timing, download, remove."""
    import tvm
    from tvm import relax

    remote = connect(agent)
    info = json.loads(within(RPC_TIMEOUT, remote.get_function("edgec.device.info")))
    assert info["agent"] == "edgec-agent" and info["version"] == "0.1.0"
    assert info["cpu_arch"] == cpu_arch and info["machine"] == machine and info["emulated"] is True
    assert info["num_cores"] >= 1

    within(RPC_TIMEOUT, remote.upload, str(artifact / "lib.so"))
    assert "lib.so" in within(RPC_TIMEOUT, remote.listdir, ".").split(",")
    rmod = within(RPC_TIMEOUT, remote.load_module, "lib.so")
    dev = remote.cpu()

    def run_model():
        vm = relax.VirtualMachine(rmod, dev)
        vm.set_input("main", tvm.runtime.tensor(x, dev))
        vm.invoke_stateful("main")
        out = vm.get_outputs("main")
        timed = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=2)("main")
        return (out if hasattr(out, "numpy") else out[0]).numpy(), timed.results

    got, seconds = within(RPC_TIMEOUT, run_model)
    np.testing.assert_allclose(got, want, **TOLERANCE)
    assert len(seconds) == 2 and all(0 < s < 60 for s in seconds)

    # per-kernel timing: a kernel of lib.so made a global function, timed on the device
    kernel = manifest["kernels"][0]

    def time_kernel():
        remote.get_function("edgec.profile.register_kernel")(rmod, kernel["kernel"], "edgec.test.kernel")
        rng = np.random.default_rng(0)
        specs = kernel["args"] + kernel["outputs"]
        arrays = [tvm.runtime.tensor(rng.standard_normal(s["shape"]).astype(s["dtype"]), dev) for s in specs]
        evaluator = remote.get_function("runtime.RPCTimeEvaluator")
        # the device type without the RPC session mask: the evaluator runs on the device
        timer = evaluator(None, "edgec.test.kernel", tvm.cpu().dlpack_device_type(), 0, 1, 3, 0, 100, 0, 1, 0, "")
        return np.frombuffer(bytes(timer(*arrays)), dtype=np.float64)

    kernel_seconds = within(RPC_TIMEOUT, time_kernel)
    assert kernel_seconds.shape == (3,) and (kernel_seconds > 0).all()
    assert within(RPC_TIMEOUT, lambda: rmod.get_function(kernel["kernel"], query_imports=True)) is not None

    blob = within(RPC_TIMEOUT, remote.download, "lib.so")
    assert bytes(blob) == (artifact / "lib.so").read_bytes()
    within(RPC_TIMEOUT, remote.remove, "lib.so")
    assert within(RPC_TIMEOUT, remote.listdir, ".") == ""


@pytest.mark.slow
def test_agent_checks_the_client_key(agent_binary):
    from tvm import rpc

    with running_agent("cortex-a7", agent_binary("cortex-a7"), "--key", "board7") as agent:
        with pytest.raises(Exception, match="cannot find server that matches key"):
            within(30, lambda: rpc.connect(agent.host, agent.port, key="other"))
        for key in ("", "board7"):  # no key, or the agent's own, are welcome on a direct connection
            remote = connect(agent, key)
            assert json.loads(within(RPC_TIMEOUT, remote.get_function("edgec.device.info")))["cpu_arch"] == "armv7"
            del remote


VANISHING_CLIENT = """
import os, sys
from tvm import rpc
remote = rpc.connect("127.0.0.1", int(sys.argv[1]))
remote.get_function("edgec.device.info")()
os._exit(3)  # gone mid-session, without a goodbye
"""


@pytest.mark.slow
def test_agent_survives_vanished_clients_and_enforces_session_timeout(agent_binary):
    from tvm import rpc

    with running_agent("cortex-a7", agent_binary("cortex-a7")) as agent:
        gone = subprocess.run([PYTHON, "-c", VANISHING_CLIENT, str(agent.port)], capture_output=True, text=True, timeout=120)
        assert gone.returncode == 3, gone.stderr[-2000:]
        remote = within(30, lambda: rpc.connect(agent.host, agent.port, session_timeout=2))
        info = remote.get_function("edgec.device.info")
        assert json.loads(within(RPC_TIMEOUT, info))["cpu_arch"] == "armv7"
        time.sleep(3)
        with pytest.raises(Exception, match="RPCSessionTimeoutError"):
            within(RPC_TIMEOUT, info)
        del info, remote
        gc.collect()
        again = connect(agent)
        assert json.loads(within(RPC_TIMEOUT, again.get_function("edgec.device.info")))["cpu_arch"] == "armv7"
        del again
        assert "session timed out after 2 s" in agent.log()


@contextlib.contextmanager
def rpc_tracker():
    from edgec.runtimes.emulate import free_port

    port = free_port()
    process = subprocess.Popen(
        [PYTHON, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1), "--silent"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, "the tracker exited"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
                break
            assert time.monotonic() < deadline, "the tracker did not listen within 90 s"
            time.sleep(0.2)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def wait_free(client, key: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        queue = within(30, client.summary).get("queue_info", {})
        if queue.get(key, {}).get("free", 0) > 0:
            return
        time.sleep(0.25)
    pytest.fail(f"no free board with key {key!r} at the tracker within {seconds:g} s")


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_tracker_request_reaches_agent(agent_binary, preset):
    from tvm import rpc

    key = f"edgec-test-{PRESETS[preset][0]}"
    with rpc_tracker() as tracker_port, running_agent(preset, agent_binary(preset), "--tracker", f"127.0.0.1:{tracker_port}", "--key", key) as agent:
        client = within(30, rpc.connect_tracker, "127.0.0.1", tracker_port)
        for _ in range(2):  # the agent offers itself again after each session
            wait_free(client, key)
            remote = within(60, lambda: client.request(key, max_retry=1))
            info = json.loads(within(RPC_TIMEOUT, remote.get_function("edgec.device.info")))
            assert info["cpu_arch"] == PRESETS[preset][0]
            del remote
        summary = within(30, client.summary)
        assert summary["server_info"][0]["key"] == f"server:{key}"
        assert summary["server_info"][0]["addr"] == ["127.0.0.1", agent.port]
        with pytest.raises(Exception, match="cannot find server that matches key"):
            within(30, lambda: rpc.connect(agent.host, agent.port))  # behind a tracker only its matchkey gets in


@pytest.mark.slow
def test_stop_during_a_session_leaves_nothing(agent_binary):
    with running_agent("cortex-a7", agent_binary("cortex-a7")) as agent:
        remote = connect(agent)
        assert within(RPC_TIMEOUT, remote.get_function("edgec.device.info"))
        workdir = workdir_of(agent)
        agent.stop()  # a session is open: its child process must go too (running_agent checks the group)
        assert agent.process.returncode == 0
    assert not workdir.exists()


# ---- fast checks of the build driver and the emulator wrapper -----------------------------


def test_compile_error_names_the_file(tmp_path, monkeypatch):
    from edgec.runtimes import agent_build

    if shutil.which("g++") is None:
        pytest.skip("no host g++")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(agent_build, "COMMON_FLAGS", (*agent_build.COMMON_FLAGS, "-fno-such-flag-for-edgec"))
    with pytest.raises(AgentBuildError, match=r"compiling \S+\.cc for x86_64 failed(.|\n)*no-such-flag-for-edgec"):
        within(300, agent_build.build_agent, "x86")
    assert not list(tmp_path.glob("edgec/agent/*/edgec-agent"))


def test_agent_build_refuses_gpu_and_unknown_presets():
    from edgec.core.errors import TargetError
    from edgec.runtimes.agent_build import build_agent

    with pytest.raises(TargetError, match="CPU code only"):
        build_agent("cuda")
    with pytest.raises(TargetError, match="unknown target preset"):
        build_agent("cortex-z9")


def test_missing_qemu_names_the_package(monkeypatch, tmp_path):
    from edgec.runtimes import emulate

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EmulatorError, match="'qemu-arm' is not installed; install it with: sudo apt-get install qemu-user "):
        emulate.emulate("cortex-a7", agent=tmp_path / "edgec-agent")  # counting boards need the plugin-capable qemu
    with pytest.raises(EmulatorError, match="apt-get install qemu-user-static"):
        emulate.emulate("cortex-a7", agent=tmp_path / "edgec-agent", count_instructions=False)


FP16_PROGRAM = r"""
#include <builtin_fp16.h>
#include <cstdint>
#include <cstdio>
#include <vector>
int main(int argc, char** argv) {  // argv: floats.bin doubles.bin out.bin
  std::vector<float> f(1 << 20);
  std::vector<double> d(1 << 18);
  FILE* in = std::fopen(argv[1], "rb"); f.resize(std::fread(f.data(), 4, f.size(), in)); std::fclose(in);
  in = std::fopen(argv[2], "rb"); d.resize(std::fread(d.data(), 8, d.size(), in)); std::fclose(in);
  FILE* out = std::fopen(argv[3], "wb");
  for (uint32_t h = 0; h < 65536; ++h) {
    float x = __extendXfYf2__<uint16_t, uint16_t, 10, float, uint32_t, 23>(static_cast<uint16_t>(h));
    std::fwrite(&x, 4, 1, out);
  }
  for (float x : f) { uint16_t h = __truncXfYf2__<float, uint32_t, 23, uint16_t, uint16_t, 10>(x); std::fwrite(&h, 2, 1, out); }
  for (double x : d) { uint16_t h = __truncXfYf2__<double, uint64_t, 52, uint16_t, uint16_t, 10>(x); std::fwrite(&h, 2, 1, out); }
  std::fclose(out);
}
"""


def test_builtin_fp16_matches_numpy(tmp_path):
    """Our compiler-rt/builtin_fp16.h (float16 for lib.so) rounds exactly like NumPy: all halves, ties, NaN, subnormals."""
    from edgec.runtimes.agent_build import AGENT_DIR

    if shutil.which("g++") is None:
        pytest.skip("no host g++")
    rng = np.random.default_rng(0)
    halves = np.arange(65536, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float32).view(np.uint32).astype(np.int64)
    near = np.concatenate([finite + step for step in (-4097, -4096, -1, 0, 1, 4095, 4096, 4097)])  # ties and neighbours
    floats = np.concatenate([near, rng.integers(0, 2**32, size=2**20 - len(near))]).astype(np.uint32).view(np.float32)
    doubles = np.concatenate([rng.standard_normal(2**17) * 1e3, rng.standard_normal(2**17) * 1e-6])
    floats.tofile(tmp_path / "f.bin")
    doubles.tofile(tmp_path / "d.bin")
    (tmp_path / "fp16.cc").write_text(FP16_PROGRAM)
    include = AGENT_DIR / "include" / "compiler-rt"
    subprocess.run(["g++", "-O1", "-std=c++17", f"-I{include}", "fp16.cc", "-o", "fp16"], cwd=tmp_path, check=True, timeout=120)
    subprocess.run(["./fp16", "f.bin", "d.bin", "out.bin"], cwd=tmp_path, check=True, timeout=120)
    out = (tmp_path / "out.bin").read_bytes()
    widened = np.frombuffer(out[: 65536 * 4], dtype=np.float32)
    narrowed = np.frombuffer(out[65536 * 4 :], dtype=np.uint16)
    want = halves.astype(np.float32)
    assert ((widened.view(np.uint32) == want.view(np.uint32)) | (np.isnan(widened) & np.isnan(want))).all()
    with np.errstate(all="ignore"):
        want16 = np.concatenate([floats.astype(np.float16), doubles.astype(np.float16)]).view(np.uint16)
    nan = np.concatenate([np.isnan(floats), np.isnan(doubles)])
    assert (narrowed[~nan] == want16[~nan]).all()
    assert np.isnan(narrowed[nan].view(np.float16)).all()
