"""Two-thread stability across processes: edgec's thread pool against TVM's and ONNX Runtime's (issue 14, part 5).

A multi-threaded runtime is stable when a fresh process runs as fast as the last one. For each
model (bench/models.py, seeded, 1x3x224x224, BN folded, x86 build verified against ONNX Runtime),
``--processes`` rounds each start one new process per variant (in turn, so load drifts alike),
which loads the build, warms up and takes the median of ``--repeat`` runs. Per variant, over the
processes: the median, p90 and p90 / median of those medians (issue 14's target: <= 1.1 over 30
processes at 2 threads), and the slowest process; and the same over the processes that
bench/core_pair.py's probe, run in each process just before and just after its timed runs, found
undisturbed (two threads able to run at full speed together: on this VM the two virtual CPUs
share one physical core for spells of about a second, and every runtime then runs two threads
at the speed of one).

Variants: ``edgec`` (lib.so as edgec ships it: its own pool, targets/thread_pool.c, in which the
caller takes the shares a late worker has not started), ``tvm`` (the same lib.so on TVM's pool,
``EDGEC_THREAD_POOL=tvm``: fixed shares per thread; ``--no-tvm-pool`` leaves it out), settings
named in ``--env`` (each ``NAME:VAR=VALUE[;VAR=VALUE]``, e.g.
``nobind:EDGEC_THREAD_POOL=tvm;TVM_BIND_THREADS=0``), and ``ort`` (ONNX Runtime on the same
model.onnx, the same thread count: the machine's own noise). One setting is this script's own:
``BENCH_PIN_MAIN_CPU=N`` pins the calling (main) thread to CPU ``N`` after the warm-up runs.

    python bench/thread_pool.py [--models mobilenet_v2] [--threads 2] [--processes 30] [--repeat 20]
                                [--no-tvm-pool] [--no-ort] [--env NAME:VAR=VALUE] [--busy N]
                                [--work DIR] [-o table.md]

``--busy N`` runs N busy processes (a Python ``while True: pass``) beside the measurement: a
machine that other work loads.
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

from timing import publish  # noqa: E402 - bench/ on sys.path first


def compile_model(name: str, work: Path) -> Path:
    """The default x86 build of ``name`` under ``work`` (kept between runs of this script)."""
    import models

    import edgec
    from edgec.passes import FoldBatchNormPass

    path = work / f"{name}_x86"
    if not (path / "manifest.json").exists():
        source = work / f"{name}.pt"
        models.save_torchscript(name, source)
        model = edgec.load(source, (1, 3, 224, 224))
        edgec.apply(model, [FoldBatchNormPass()], measure=False)
        edgec.compile(model, "x86", path)  # verified against ONNX Runtime
    return path


def worker(job: dict) -> dict:
    """In a fresh process: load, warm up, then the median ms of ``repeat`` runs, and whether
    bench/core_pair.py's probe, just before or just after them, found two threads unable to run
    at full speed together (``shared``)."""
    import time

    import numpy as np

    import core_pair

    verdicts = []

    def probe() -> None:
        if job["probe"]:
            time.sleep(core_pair.SETTLE_S)  # the runtime's own pool threads stop spinning first
            verdicts.append(core_pair.measure().shared)

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype("float32")
    if job["runtime"] == "ort":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = job["threads"]
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(Path(job["path"]) / "model.onnx"), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        for _ in range(5):
            session.run(None, feed)
        probe()
        times = []
        for _ in range(job["repeat"]):
            start = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - start) * 1e3)
    else:
        from edgec.core.artifact import load_artifact
        from edgec.runtimes.local import LocalRunner

        runner = LocalRunner(load_artifact(job["path"]), threads=job["threads"])
        runner.time_ms([x], repeat=1, warmup=5)  # the pool starts here
        if os.environ.get("BENCH_PIN_MAIN_CPU"):
            os.sched_setaffinity(0, {int(os.environ["BENCH_PIN_MAIN_CPU"])})  # 0: the calling thread (Linux)
        probe()
        times = runner.time_ms([x], repeat=job["repeat"], warmup=2)
    probe()
    return {"ms": statistics.median(times), "shared": any(verdicts) if job["probe"] else None}


def spread(medians: list[float]) -> tuple[float, float]:
    """(median, p90) of per-process medians."""
    return statistics.median(medians), statistics.quantiles(medians, n=10, method="inclusive")[-1]


def parse_env(specs: list[str], tvm_pool: bool = True) -> dict[str, dict[str, str]]:
    variants = {"edgec": {}, **({"tvm": {"EDGEC_THREAD_POOL": "tvm"}} if tvm_pool else {})}
    for spec in specs:
        name, _, assignments = spec.partition(":")
        pairs = [item.partition("=") for item in assignments.split(";") if item]
        if not name or not pairs or any(not key or not sep for key, sep, _ in pairs):
            raise SystemExit(f"--env {spec!r}: expected NAME:VAR=VALUE[;VAR=VALUE], e.g. spin100:TVM_THREAD_POOL_SPIN_COUNT=100")
        variants[name] = {key: value for key, _, value in pairs}
    return variants


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=30, help="fresh processes per variant")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per process (after 5 warm-up runs)")
    parser.add_argument("--env", action="append", default=[], help="another variant: NAME:VAR=VALUE[;VAR=VALUE]")
    parser.add_argument("--no-tvm-pool", dest="tvm_pool", action="store_false", help="leave TVM's pool (EDGEC_THREAD_POOL=tvm) out")
    parser.add_argument("--no-ort", dest="ort", action="store_false", help="leave ONNX Runtime out")
    parser.add_argument("--busy", type=int, default=0, help="busy processes to run beside the measurement (a loaded machine)")
    parser.add_argument("--work", type=Path, default=None, help="where the builds are kept (default: a temporary directory)")
    parser.add_argument("-o", "--output", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every process's median here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.processes < 2:
        parser.error("--processes must be at least 2 (p90 over processes)")
    variants = parse_env(args.env, args.tvm_pool)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgec-threadpool-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = [
        f"threads {args.threads}, {args.processes} fresh processes per variant, median of {args.repeat} runs each",
        "",
        "| model | variant | median ms | p90 ms | p90 / median | slowest ms | processes undisturbed "
        "| their p90 / median |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    import core_pair

    probing = core_pair.available("processes are")  # builds it once, here, not in the first worker
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        rows, raw = _measure(args, variants, work, probing)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    lines += rows
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    lines.append(
        "\nundisturbed: processes in which bench/core_pair.py's probe, just before and just after the timed "
        "runs, found two threads able to run at full speed together (not sharing one physical core)"
    )
    if args.busy:
        lines.append(f"\n{args.busy} busy process(es) (a Python `while True: pass`) ran beside every measurement")
    lines.append(f"\nload average at the end: {load} ({os.cpu_count()} CPUs)")
    publish("\n".join(lines), args.output, args.json, raw)


def _measure(args, variants: dict, work: Path, probing: bool) -> tuple[list[str], dict]:
    """Every model's processes, variants in turn: the table's rows (one per variant) and the raw results."""
    rows, raw = [], {}
    for name in args.models.split(","):
        path = str(compile_model(name, work))
        runs = {variant: [] for variant in [*variants, *(["ort"] if args.ort else [])]}
        for index in range(args.processes):
            for variant in runs:
                job = {
                    "path": path, "threads": args.threads, "repeat": args.repeat, "probe": probing,
                    "runtime": "ort" if variant == "ort" else "edgec",
                }  # fmt: skip
                env = {**os.environ, "TVM_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
                env.update(variants.get(variant, {}))
                done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, env=env)
                if done.returncode:
                    raise SystemExit(f"{name} {variant}: worker failed: {done.stderr.strip().splitlines()[-1:]}")
                runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name}: process {index + 1}/{args.processes}", end="\r", file=sys.stderr)
        for variant, results in runs.items():
            medians = [result["ms"] for result in results]
            middle, p90 = spread(medians)
            clean = [result["ms"] for result in results if result["shared"] is False]
            if len(clean) >= 2:
                clean_middle, clean_p90 = spread(clean)
                ratio = f"{clean_p90 / clean_middle:.2f}"
            else:
                ratio = "n/a"
            counted = f"{len(clean)} of {len(results)}" if probing else "not probed"
            rows.append(
                f"| {name} | {variant} | {middle:.3f} | {p90:.3f} | {p90 / middle:.2f} | {max(medians):.3f} "
                f"| {counted} | {ratio} |"
            )
        raw[name] = {"variants": {key: variants.get(key, {}) for key in runs}, "processes": runs}
    return rows, raw


if __name__ == "__main__":
    main()
