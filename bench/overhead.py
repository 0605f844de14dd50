"""Time outside the kernels, before and after edgec's stack buffers (edgec/stack_buffers.py).

For each model (bench/models.py, seeded, 1x3x224x224, BN folded) two x86 builds are
compiled and verified: ``stack_buffers=False`` (kernels' 1-16 KiB scratch buffers in TVM's
workspace pool, the build before) and the default. Then, per thread count, one worker
process (TVM_NUM_THREADS is read once per process) loads both and, interleaved over
rounds, times ``invoke_stateful`` with TVM's timer (``--repeat`` runs per round); it also
runs ``edgec profile``'s measurement once per build (each kernel timed alone, on its own
inputs: warm caches), whose kernel sum is printed beside the end-to-end median.

    python bench/overhead.py [--models shufflenet_v2_x0_5,mobilenet_v3_small,mobilenet_v2]
                             [--threads 1,2] [--rounds 7] [--repeat 20] [--work DIR] [-o table.md]

Ratios (after / before) are medians of per-round ratios, so load from other processes on
a shared machine cancels out better than in the milliseconds; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from timing import interleave, publish  # noqa: E402 - bench/ on sys.path first

VARIANTS = {"pool": False, "stack": True}  # name -> BuildOptions.stack_buffers
DEFAULT_MODELS = "shufflenet_v2_x0_5,mobilenet_v3_small,mobilenet_v2"


def compile_variants(name: str, work: Path) -> dict[str, Path]:
    """Both builds of ``name`` under ``work`` (kept between runs of this script)."""
    import models

    import edgec
    from edgec.passes import FoldBatchNormPass

    source = work / f"{name}.pt"
    if not source.exists():
        models.save_torchscript(name, source)
    paths = {}
    for variant, stack in VARIANTS.items():
        path = work / f"{name}_{variant}"
        if not (path / "manifest.json").exists():
            model = edgec.load(source, (1, 3, 224, 224))
            edgec.apply(model, [FoldBatchNormPass()], measure=False)
            edgec.compile(model, "x86", path, stack_buffers=stack)  # verified against ONNX Runtime
        paths[variant] = path
    return paths


def worker(paths: dict[str, str], threads: int, rounds: int, repeat: int) -> dict:
    """In a process of its own: end-to-end samples per build, interleaved, and the profile's kernel sum."""
    import numpy as np

    from edgec.core.artifact import load_artifact
    from edgec.runtimes.local import LocalRunner
    from edgec.runtimes.profile import profile
    from edgec.runtimes.session import LocalDevice

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype("float32")
    runners = {variant: LocalRunner(load_artifact(path), threads=threads) for variant, path in paths.items()}
    timers = {variant: (lambda runner=runner: runner.time_ms([x], repeat=repeat, warmup=5)) for variant, runner in runners.items()}
    samples = interleave(timers, rounds)
    kernels = {variant: profile(load_artifact(path), LocalDevice(threads)).kernels_ms for variant, path in paths.items()}
    return {"samples": samples, "kernels_ms": kernels, "calls": len(load_artifact(paths["stack"]).manifest["kernels"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--work", type=Path, default=None, help="where the builds are kept (default: a temporary directory)")
    parser.add_argument("-o", "--output", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(worker(job["paths"], job["threads"], args.rounds, args.repeat)))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="edgec-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = [
        "| model | threads | kernel calls | e2e pool ms | e2e stack ms | stack / pool | profile kernel sum pool / stack ms |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    raw = {}
    for name in args.models.split(","):
        paths = {variant: str(path) for variant, path in compile_variants(name, work).items()}
        for threads in (int(t) for t in args.threads.split(",")):
            job = json.dumps({"paths": paths, "threads": threads})
            env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
            command = [sys.executable, __file__, "--worker", job, "--rounds", str(args.rounds), "--repeat", str(args.repeat)]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            samples = result["samples"]
            per_round = [
                statistics.median(after) / statistics.median(before)
                for before, after in zip(_rounds(samples["pool"], args.repeat), _rounds(samples["stack"], args.repeat), strict=True)
            ]
            pool, stack = statistics.median(samples["pool"]), statistics.median(samples["stack"])
            kernels = result["kernels_ms"]
            lines.append(
                f"| {name} | {threads} | {result['calls']} | {pool:.3f} | {stack:.3f} | {statistics.median(per_round):.3f} "
                f"| {kernels['pool']:.3f} / {kernels['stack']:.3f} |"
            )
            raw[f"{name}/{threads}"] = result
            print(lines[-1], file=sys.stderr)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    lines.append(f"\nload average at the end: {load} ({os.cpu_count()} CPUs)")
    publish("\n".join(lines), args.output, None, raw)


def _rounds(samples: list[float], repeat: int) -> list[list[float]]:
    return [samples[i : i + repeat] for i in range(0, len(samples), repeat)]


if __name__ == "__main__":
    main()
