"""Can two threads run at full speed together on this machine, now? (issue 14, part 5)

On this 2-vCPU VM, two-thread runs of every runtime are sometimes about as slow as one thread.
The probe (bench/core_pair.c) times a multiply-add loop bound by the FMA units, as a
convolution's register tile is: one thread alone, then two at once. Two virtual CPUs on two
physical cores run it as fast together as alone; on the SMT siblings of one core (where the
hypervisor put them at that moment), or with one CPU taken by another busy thread, each of the
two takes about twice as long. bench/peers.py and bench/thread_pool.py call ``measure`` around
their two-thread timings and report which ones the machine disturbed.

    python bench/core_pair.py [--seconds 60] [--every 0.25]    # a timeline: how often, how long
    python bench/core_pair.py --build BUILD [--seconds 25]     # an x86 build's runs, each between probes

With ``--build``, one process alternates a probe and one two-thread inference of the build,
and splits the inference times by the probes on both sides. The pool's worker then sleeps as
soon as a kernel ends (``EDGEC_THREAD_POOL_SPIN_US=0``, and ``TVM_THREAD_POOL_SPIN_COUNT=0`` for
TVM's pool under ``EDGEC_THREAD_POOL=tvm``; by default they spin for 2 ms and about 0.16 s, and a
probe right after an inference would find its own runtime's spinning worker): the times are
slower than edgec's defaults, and only their split means something.

The C file is compiled once with the system's C compiler (``cc``/``gcc``, ``-O2 -march=native``)
into ~/.cache/edgec/bench/, named after its source's hash.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_suffix(".c")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgec" / "bench"
SHARED_ABOVE = 1.5  # two threads at once: about 1.0x of one alone on two cores, 2.0x on one core
STEPS, ROUNDS = 10_000, 20  # one round: ~16 us alone on a 4 GHz core with two 256-bit FMA units
SETTLE_S = 0.3  # before a probe right after a runtime ran: its pool threads stop spinning (TVM's: ~0.16 s)


class ProbeUnavailable(RuntimeError):
    """No C compiler, or the probe did not build or start its thread."""


@dataclass(frozen=True)
class CorePair:
    """Median seconds of the loop: one thread alone, then each of two threads running at once."""

    alone_s: float
    first_s: float
    second_s: float

    @property
    def slowdown(self) -> float:
        """The slower of the two threads at once against one alone (1.0: two cores; 2.0: one)."""
        return max(self.first_s, self.second_s) / self.alone_s

    @property
    def shared(self) -> bool:
        return self.slowdown > SHARED_ABOVE


def build(source: Path = SOURCE, cache: Path = CACHE) -> Path:
    """The probe's shared library, compiled on first use; the name carries the source's hash."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    library = cache / f"core_pair-{digest}.so"
    if library.is_file():
        return library
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ProbeUnavailable("no C compiler (cc or gcc) on PATH: install gcc (make setup does)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as directory:
        partial = Path(directory) / library.name
        for flags in (["-march=native"], []):  # -march=native: the host's vector FMA, where known
            done = subprocess.run(
                [compiler, "-O2", *flags, "-shared", "-fPIC", "-o", str(partial), str(source), "-lpthread"],
                capture_output=True,
                text=True,
            )
            if done.returncode == 0:
                partial.replace(library)  # whole or not at all
                return library
    raise ProbeUnavailable(f"{compiler} could not build {source.name}: {done.stderr.strip()[-300:]}")


_loaded: ctypes.CDLL | None = None


def measure(steps: int = STEPS, rounds: int = ROUNDS) -> CorePair:
    """One probe: ``rounds`` rounds of ``steps`` loop steps (about 2 ms with the defaults)."""
    global _loaded
    if _loaded is None:
        _loaded = ctypes.CDLL(str(build()))
        _loaded.core_pair_seconds.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.POINTER(ctypes.c_double)]
        _loaded.core_pair_seconds.restype = ctypes.c_int
    seconds = (ctypes.c_double * 3)()
    if _loaded.core_pair_seconds(steps, rounds, seconds) != 0:
        raise ProbeUnavailable("the probe could not start its second thread")
    return CorePair(*seconds)


def available(what: str) -> bool:
    """Whether the probe builds and runs here; if not, a warning that ``what`` goes unchecked."""
    try:
        measure()
        return True
    except ProbeUnavailable as error:
        print(f"warning: no core-pair probe ({error}); {what} not checked", file=sys.stderr)
        return False


def split_runs(build: Path, seconds: float) -> str:
    """Inference times of ``build`` at two threads, each between two probes, split by their verdicts."""
    os.environ.update(TVM_NUM_THREADS="2", EDGEC_THREAD_POOL_SPIN_US="0", TVM_THREAD_POOL_SPIN_COUNT="0")  # before TVM loads
    import numpy as np
    import tvm
    from tvm import relax

    from edgec.core.artifact import load_artifact

    artifact = load_artifact(build)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact.lib)), tvm.cpu())
    spec = artifact.inputs[0]
    vm.set_input("main", tvm.runtime.tensor(np.zeros(spec["shape"], dtype=spec["dtype"])))
    for _ in range(10):
        vm.invoke_stateful("main")
    runs, start = [], time.monotonic()
    while time.monotonic() - start < seconds:
        before = measure(steps=STEPS // 2, rounds=5)
        begin = time.perf_counter()
        vm.invoke_stateful("main")
        elapsed = (time.perf_counter() - begin) * 1e3
        runs.append((elapsed, before.slowdown, measure(steps=STEPS // 2, rounds=5).slowdown))
    times = np.array([run[0] for run in runs])
    shared = np.array([min(run[1], run[2]) > SHARED_ABOVE for run in runs])  # on both sides
    clean = np.array([max(run[1], run[2]) < 1.2 for run in runs])
    reference = float(np.median(times[clean])) if clean.any() else float(np.median(times))
    slow = times > 1.3 * reference
    lines = [
        f"{len(runs)} two-thread runs of {build}: median {np.median(times):.2f} ms",
        f"  probes clean on both sides: {clean.sum()} runs, median {reference:.2f} ms",
        f"  probes shared on both sides: {shared.sum()} runs"
        + (f", median {np.median(times[shared]):.2f} ms" if shared.any() else ""),
        f"  slow runs (> 1.3x the clean median): {slow.sum()}; with shared probes on both sides {(slow & shared).sum()}, "
        f"on one side {(slow & ~shared & ~clean).sum()}, clean on both {(slow & clean).sum()}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to watch")
    parser.add_argument("--every", type=float, default=0.25, help="seconds between probes")
    parser.add_argument("--build", type=Path, help="an x86 build directory (edgec compile -o): time its runs between probes")
    args = parser.parse_args(argv)
    try:
        first = measure()
    except ProbeUnavailable as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    if args.build is not None:
        if not (args.build / "manifest.json").is_file():
            print(f"Error: {args.build} is not an edgec build (no manifest.json): give edgec compile's -o directory", file=sys.stderr)
            return 1
        print(split_runs(args.build, args.seconds))
        return 0
    print(f"one thread alone: {first.alone_s * 1e6:.1f} us per probe round; watching {args.seconds:.0f} s", file=sys.stderr)
    start, samples = time.monotonic(), []
    while time.monotonic() - start < args.seconds:
        samples.append((time.monotonic() - start, measure()))
        time.sleep(args.every)
    shared = [probe.shared for _, probe in samples]
    spans, begin = [], None
    for (moment, probe), previous in zip(samples, [False, *shared]):
        if probe.shared and not previous:
            begin = moment
        if previous and not probe.shared:
            spans.append(moment - begin)
    if shared and shared[-1]:
        spans.append(samples[-1][0] - begin + args.every)
    slowdowns = sorted(probe.slowdown for _, probe in samples)
    print(f"{len(samples)} probes, {sum(shared)} with the two threads on one core ({100 * sum(shared) / len(samples):.0f}%)")
    print(f"slowdown of two threads at once: median {slowdowns[len(slowdowns) // 2]:.2f}, max {slowdowns[-1]:.2f}")
    if spans:
        print(f"shared spells: {len(spans)}, longest {max(spans):.2f} s, median {sorted(spans)[len(spans) // 2]:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
