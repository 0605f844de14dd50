"""edgec's instruction-counting QEMU plugin (agent/plugin/icount.c), on small programs.

The plugin is built with the host's gcc (cached, well under a second) and
loaded into Debian's qemu-user: small C programs, built for x86-64 (run under
qemu-x86_64) and armv7 (qemu-arm, a 32-bit guest whose memory qemu places at
an offset), ask for their own instruction count the way edgec-agent does
(agent/src/icount.h). Counts are asserted exactly where they are
deterministic: the same program on the same data executes the same
instructions on every run. Model-level counts (bench/profile on emulated
boards) are in test_emulated_boards.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgec.core.errors import DeviceError
from edgec.runtimes import guest_counter

AGENT = Path(__file__).resolve().parents[2] / "agent"

# Asks for the counts around `loops` iterations of a loop, with `spinners` threads spinning meanwhile;
# prints "answered thread all_threads spins" (answered 0: nobody filled the request; spins: loop
# turns the spinners made during the count).
PROGRAM = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "icount.h"

static volatile int stop, started;
static volatile unsigned long sink, spins;

static int ask(struct edgec_icount *request) {
  request->magic = EDGEC_ICOUNT_ASK;
  syscall(EDGEC_ICOUNT_SYSCALL, (long)EDGEC_ICOUNT_ASK, request);
  return request->magic == EDGEC_ICOUNT_ANSWER;
}
static void *spin(void *unused) {
  (void)unused;
  __sync_fetch_and_add(&started, 1);
  while (!stop) spins++;
  return NULL;
}
int main(int argc, char **argv) {
  long loops = atol(argv[1]);
  int spinners = atoi(argv[2]);
  pthread_t threads[8];
  for (int i = 0; i < spinners; ++i) pthread_create(&threads[i], NULL, spin, NULL);
  while (started < spinners) usleep(1000);
  struct edgec_icount before = {0}, after = {0};
  unsigned long spins_before = spins;
  int answered = ask(&before);
  for (long i = 0; i < loops; ++i) sink += i;
  /* (no system call in here: glibc takes other paths in syscalls once a process has threads) */
  answered &= ask(&after);
  unsigned long spun = spins - spins_before;
  stop = 1;
  for (int i = 0; i < spinners; ++i) pthread_join(threads[i], NULL);
  printf("%d %llu %llu %lu\n", answered, (unsigned long long)(after.thread - before.thread),
         (unsigned long long)(after.all_threads - before.all_threads), spun);
  return 0;
}
"""

GUESTS = {  # name -> (C compiler, qemu-user binary, its options)
    "x86_64": ("gcc", "qemu-x86_64", []),
    "armv7": ("arm-linux-gnueabihf-gcc", "qemu-arm", ["-L", "/usr/arm-linux-gnueabihf", "-cpu", "cortex-a7"]),
}


def _header_constants() -> dict[str, int]:
    text = (AGENT / "src" / "icount.h").read_text()
    return {name: int(value, 0) for name, value in re.findall(r"#define EDGEC_ICOUNT_(\w+) (0x[0-9a-fA-F]+|\d+)u?", text)}


def test_python_guest_side_uses_the_header_numbers():
    assert _header_constants() == {
        "SYSCALL": guest_counter.SYSCALL, "ASK": guest_counter.ASK, "ANSWER": guest_counter.ANSWER,
        "UNCOUNTED_CALLS": guest_counter.UNCOUNTED_CALLS,
    }  # fmt: skip


def test_no_counter_outside_qemu():
    """On this machine (a real one) the request stays unanswered, and the system call harms nothing."""
    assert guest_counter.read_counts() is None
    with pytest.raises(RuntimeError, match="counts no instructions"):
        guest_counter.count_calls(lambda: None, 1, 1)


@pytest.fixture(scope="module")
def plugin() -> Path:
    from edgec.runtimes.agent_build import build_counter_plugin

    return build_counter_plugin()


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict[str, Path]:
    """guest -> the counting test program built for it (guests whose tools are missing are left out)."""
    root = tmp_path_factory.mktemp("icount")
    source = root / "program.c"
    source.write_text(PROGRAM)
    built = {}
    for guest, (compiler, qemu, _) in GUESTS.items():
        if shutil.which(compiler) is None or shutil.which(qemu) is None:
            continue
        binary = root / guest
        subprocess.run([compiler, "-O1", "-pthread", f"-I{AGENT / 'src'}", str(source), "-o", str(binary)], check=True)
        built[guest] = binary
    return built


def run(programs, guest: str, plugin: Path | None, loops: int, spinners: int = 0) -> tuple[bool, int, int, int]:
    if guest not in programs:
        pytest.skip(f"{GUESTS[guest][0]} or {GUESTS[guest][1]} missing (make setup installs them)")
    _, qemu, options = GUESTS[guest]
    command = [qemu, *options, *(["-plugin", str(plugin)] if plugin else []), str(programs[guest]), str(loops), str(spinners)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    answered, thread, all_threads, spins = done.stdout.split()
    return answered == "1", int(thread), int(all_threads), int(spins)


@pytest.mark.parametrize("guest", GUESTS)
def test_counts_are_deterministic_and_proportional_to_work(programs, plugin, guest):
    first = run(programs, guest, plugin, 200_000)
    assert first[0] and first[1] > 200_000
    assert run(programs, guest, plugin, 200_000) == first  # to the instruction
    double = run(programs, guest, plugin, 400_000)
    assert double[1] == pytest.approx(2 * first[1], rel=0.01)


@pytest.mark.parametrize("guest", GUESTS)
def test_spinning_threads_do_not_change_the_askers_count(programs, plugin, guest):
    alone = run(programs, guest, plugin, 2_000_000)
    answered, thread, all_threads, spins = run(programs, guest, plugin, 2_000_000, spinners=2)
    assert answered and thread == alone[1]
    assert all_threads - thread >= spins  # whatever the spinners ran meanwhile, only the total shows it


def test_without_the_plugin_nothing_answers(programs):
    assert run(programs, "x86_64", None, 1000) == (False, 0, 0, 0)


def test_plugin_rejects_unknown_options(programs, plugin):
    if "x86_64" not in programs:
        pytest.skip("gcc or qemu-x86_64 missing")
    done = subprocess.run(["qemu-x86_64", "-plugin", f"{plugin},bogus=1", str(programs["x86_64"]), "1", "0"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0 and "unknown option 'bogus=1'" in done.stderr


def test_python_guest_counts_its_calls(plugin):
    """runtimes/guest_counter.py in a Python under qemu-x86_64 (what the ncnn peer and `device serve` use)."""
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-x86_64 missing (apt-get install qemu-user)")
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import guest_counter as g\n"
        "def work(n):\n    total = 0\n    for i in range(n): total += i\n"
        "print(json.dumps([g.count_calls(lambda: work(20000), 1, 2), g.count_calls(lambda: work(40000), 2, 1)]))\n"
    )
    runtimes = Path(guest_counter.__file__).parent
    done = subprocess.run(["qemu-x86_64", "-plugin", str(plugin), sys.executable, "-S", "-c", code, str(runtimes)],
                          capture_output=True, text=True, timeout=300, env={"PYTHONHASHSEED": "0"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    import json

    once, twice = json.loads(done.stdout)
    assert once["number"] == 1 and twice["number"] == 2 and once["other_threads"] == [0, 0]
    small, large = once["instructions"][0], twice["instructions"][0] / 2
    assert small > 20000 and large == pytest.approx(2 * small, rel=0.05)  # Python's interpreter is near-deterministic


# ---- the client side (runtimes/icount.py) and what the CLI says ---------------------------


class FakeDevice:
    """A Device whose edgec.device.count_evaluator answers ``reply`` (as JSON)."""

    label = "fake board"

    def __init__(self, reply: dict):
        self.reply = reply
        self.info = {"counts_instructions": True, "emulated_cpu": "cortex-a7"}
        self.calls = []

    def step(self, what):
        import contextlib

        return contextlib.nullcontext()

    def count_evaluator(self):
        import json

        def make(module, name, number, repeat):
            self.calls.append((module, name, number, repeat))
            return lambda *args: json.dumps(self.reply)

        return make


def test_count_reads_the_devices_answer():
    from edgec.runtimes.icount import count, counts_instructions

    device = FakeDevice({"number": 2, "instructions": [2000, 2002], "other_threads": [0, 5]})
    counted = count(device, None, "kernel", [], number=2)
    assert device.calls == [(None, "kernel", 2, 2)]
    assert counted.runs == (1000, 1001) and counted.per_call == 1000 and not counted.deterministic
    assert counted.other_threads == 5 and counted.cpu == "cortex-a7" and counts_instructions(device)


def test_count_rejects_a_foreign_answer():
    from edgec.core.errors import DeviceError
    from edgec.runtimes.icount import count

    with pytest.raises(DeviceError, match="not edgec's"):
        count(FakeDevice({"number": 1, "instructions": [1]}), None, "kernel", [], number=1, repeat=2)


def test_instruction_summary_says_what_was_counted():
    from edgec.report import instruction_summary
    from edgec.runtimes.icount import InstructionCount

    exact = InstructionCount(per_call=139_612_004, runs=(139_612_004, 139_612_004), other_threads=0, cpu="cortex-a7")
    assert instruction_summary(exact, 0.4634) == "139,612,004 (emulated cortex-a7, deterministic); 0.46 per MAC"
    shaky = InstructionCount(per_call=10, runs=(9, 11), other_threads=7, cpu=None)
    text = instruction_summary(shaky, None)
    assert "NOT deterministic: runs counted 9, 11" in text and "other threads ran 7" in text and "per MAC" not in text


def test_this_machine_counts_nothing_and_emulate_help_says_it_counts():
    from click.testing import CliRunner

    from edgec.cli import cli
    from edgec.runtimes.icount import counts_instructions
    from edgec.runtimes.session import LocalDevice

    assert not counts_instructions(LocalDevice())
    done = CliRunner().invoke(cli, ["device", "emulate", "--help"])
    assert done.exit_code == 0 and "counts the ARM instructions" in done.output and "--no-count" in done.output


def test_counting_on_this_machine_says_why_not():
    """The Python device functions (`edgec device serve`) count only under qemu with the plugin."""
    import tvm

    from edgec.runtimes.icount import count
    from edgec.runtimes.session import LocalDevice

    tvm.register_global_func("edgec.test.noop", lambda: None, override=True)
    with pytest.raises(DeviceError, match="counts no instructions"):
        count(LocalDevice(), None, "edgec.test.noop", [])
