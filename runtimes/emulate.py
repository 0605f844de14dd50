"""Run edgec-agent for an ARM preset on this x86 machine, under qemu-user.

    with emulate("cortex-a7") as agent:          # builds the agent and the plugin (cached) if needed
        remote = tvm.rpc.connect("127.0.0.1", agent.port)

By default the board counts instructions: the agent runs as ``qemu-arm -L
/usr/arm-linux-gnueabihf -cpu cortex-a7 -plugin libedgec-icount.so
edgec-agent --port P`` (aarch64: ``qemu-aarch64 -L /usr/aarch64-linux-gnu
-cpu cortex-a53``), Debian's dynamic qemu-user, the only one that loads TCG
plugins. ``-cpu`` is the preset's CPU (its ``emulated_cpu`` where QEMU lacks it:
cortex-a76 for cortex-a55), so that code which detects CPU features at run time
takes the board's paths. Kernels run on one thread
(``TVM_NUM_THREADS=1``): the plugin counts per thread, and the count of the
thread that runs the model is then all of the model's work, with no idle
worker spinning in it. ``count_instructions=False`` runs ``qemu-arm-static``
(qemu-user-static) without the plugin, with the agent's default threads.

The process group is the agent's own; ``EDGEC_EMULATED=1`` and
``EDGEC_EMULATED_CPU`` tell ``edgec.device.info`` that timings mean nothing
and which CPU is emulated. An x86 preset runs the host build directly. Only
loopback addresses: an agent runs whatever code it is sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from edgec.core.errors import EmulatorError
from edgec.runtimes.agent_build import build_agent, build_counter_plugin
from edgec.targets.presets import PRESETS


@dataclasses.dataclass(frozen=True)
class Emulator:
    """How to run a binary of one CPU architecture here."""

    qemu: str | None  # qemu-user-static's binary; None: runs natively
    counting_qemu: str | None  # qemu-user's dynamic binary, which loads the counting plugin
    sysroot: str | None
    sysroot_package: str | None


EMULATORS = {
    "armv7": Emulator("qemu-arm-static", "qemu-arm", "/usr/arm-linux-gnueabihf", "libc6-armhf-cross"),
    "aarch64": Emulator("qemu-aarch64-static", "qemu-aarch64", "/usr/aarch64-linux-gnu", "libc6-arm64-cross"),
    "x86_64": Emulator(None, None, None, None),
}
QEMU_PACKAGE = "qemu-user-static"
COUNTING_QEMU_PACKAGE = "qemu-user"


class EmulatedAgent:
    """A running agent: ``.host``, ``.port``, ``.address``; ``stop()`` or use it as a context manager."""

    def __init__(self, process: subprocess.Popen, host: str, port: int, log_path: Path):
        self.process = process
        self.host = host
        self.port = port
        self.log_path = log_path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        """What the agent wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole process group (agent, qemu, a running session), SIGKILL what outlives ``timeout``."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # the group may hold a session child even after the agent itself exited
        _signal_group(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def __enter__(self) -> EmulatedAgent:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def emulate(
    preset: str,
    *,
    agent: Path | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    extra_args: tuple[str, ...] = (),
    timeout: float = 60.0,
    count_instructions: bool = True,
) -> EmulatedAgent:
    """Start the agent for ``preset`` (built if ``agent`` is not given) and wait until it accepts connections.

    ``port``: None picks a free loopback port. ``extra_args`` go to the agent
    (``--tracker``, ``--key``, ``--workdir``). ``timeout`` bounds the wait.
    ``count_instructions``: run under qemu-user with the counting plugin (see above).
    """
    if preset not in PRESETS:
        raise EmulatorError(f"unknown target preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    target = PRESETS[preset]
    emulator = EMULATORS.get(target.cpu_arch)
    if emulator is None:
        raise EmulatorError(f"no emulator for target {preset!r}")
    counting = count_instructions and emulator.qemu is not None
    cpu = target.emulated_cpu or target.mcpu
    command = _emulator_command(emulator, cpu, counting)
    binary = Path(agent) if agent is not None else build_agent(preset)
    port = port or free_port(host)
    handle, log_name = tempfile.mkstemp(prefix="edgec-agent-", suffix=".log")
    log_path = Path(log_name)
    env = dict(os.environ, EDGEC_EMULATED="1" if emulator.qemu else "0")
    if emulator.qemu:
        env["EDGEC_EMULATED_CPU"] = cpu or ""
    if counting:
        env["TVM_NUM_THREADS"] = "1"
    with os.fdopen(handle, "wb") as log_file:
        process = subprocess.Popen(
            [*command, str(binary), "--host", host, "--port", str(port), *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: stop() reaches every child
        )
    running = EmulatedAgent(process, host, port, log_path)
    try:
        _wait_until_listening(running, timeout)
    except BaseException:
        running.stop()
        raise
    return running


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _emulator_command(emulator: Emulator, cpu: str | None, counting: bool) -> list[str]:
    """qemu and its options; ``counting``: the dynamic qemu-user with the counting plugin (built here)."""
    if emulator.qemu is None:
        return []
    from shutil import which

    name, package = (emulator.counting_qemu, COUNTING_QEMU_PACKAGE) if counting else (emulator.qemu, QEMU_PACKAGE)
    qemu = which(name)
    if qemu is None:
        hint = " (qemu-user-static cannot load plugins; without counting: --no-count)" if counting else ""
        raise EmulatorError(f"'{name}' is not installed; install it with: sudo apt-get install {package}{hint}")
    if not Path(emulator.sysroot, "lib").is_dir():
        raise EmulatorError(
            f"the target's C library is missing under {emulator.sysroot}; "
            f"install it with: sudo apt-get install {emulator.sysroot_package}"
        )
    command = [qemu, "-L", emulator.sysroot]
    if cpu:
        command += ["-cpu", cpu]
    if counting:
        command += ["-plugin", str(build_counter_plugin())]
    return command


def _wait_until_listening(agent: EmulatedAgent, timeout: float) -> None:
    """Poll until the agent has printed its 'listening' line and a TCP connect succeeds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.process.poll() is not None:
            raise EmulatorError(
                f"edgec-agent exited with status {agent.process.returncode} before listening:\n{agent.log().strip()[-2000:]}"
            )
        if " listening on " in agent.log():
            with contextlib.suppress(OSError), socket.create_connection((agent.host, agent.port), timeout=2):
                return  # an empty connection: the agent drops it at once
        time.sleep(0.1)
    raise EmulatorError(f"edgec-agent did not accept connections on {agent.address} within {timeout:g} s:\n{agent.log().strip()[-2000:]}")


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
