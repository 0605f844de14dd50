"""edgec against PyTorch eager and ONNX Runtime on this machine, side by side.

For MobileNetV2, ResNet-18 and SqueezeNet 1.1 at batch 1 (bench/models.py,
seeded weights) one table: median latency of PyTorch eager, ONNX Runtime
(ORT_ENABLE_ALL, same threads), edgec with TVM's default Relax build (no
schedules), edgec with the schedule library, and optionally edgec tuned
(``--tune-trials N``; slow); each edgec column's ratio to ONNX Runtime,
compile and tuning seconds. Every edgec variant's outputs are checked
against ONNX Runtime on the same input (|d| <= atol + rtol |ort|).

Timing: the machine is shared and noisy, so runners are measured
interleaved, round after round (each round: every runner runs ``--repeat``
times, with a pause between runners so the previous runtime's spinning
threads go idle). The table gives each runner's median over all runs, and
its ratio to ONNX Runtime as the median over rounds of the ratio of the two
round medians (pairs taken minutes apart would compare different loads).

    python bench/compare.py [--models mobilenet_v2,resnet18,squeezenet1_1] [--threads N]
                            [--rounds 15] [--repeat 5] [--tune-trials N] [--tuning-db DIR]
                            [-o results.md] [--json samples.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from timing import publish  # noqa: E402 - bench/ on sys.path first

RTOL = ATOL = 1e-4
PAUSE_S = 0.25  # between runners: lets the previous runtime's spinning threads (OpenMP, ORT, TVM) go idle
SLOW_BLOCK_MS = 1500.0  # a runner this slow runs fewer times per round


@dataclasses.dataclass
class Runner:
    name: str
    run_ms: Callable[[int], list[float]]  # n timed runs -> latencies
    samples: list[float] = dataclasses.field(default_factory=list)
    round_medians: list[float] = dataclasses.field(default_factory=list)
    compile_s: float | None = None
    tune_s: float | None = None
    check: str = ""
    first_ms: float = 0.0  # a first estimate, to size the blocks of slow runners
    schedules: dict = dataclasses.field(default_factory=dict)  # the artifact manifest's "schedules"

    @property
    def median(self) -> float:
        return float(np.median(self.samples)) if self.samples else float("nan")


def _wall_ms(function: Callable[[], object], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def torch_runner(module, x: np.ndarray) -> Runner:
    import torch

    tensor = torch.from_numpy(x)

    def run(count: int) -> list[float]:
        with torch.inference_mode():
            module(tensor)
            return _wall_ms(lambda: module(tensor), count)

    return Runner("PyTorch eager", run)


def ort_runner(model, x: np.ndarray, threads: int) -> tuple[Runner, np.ndarray]:
    from edgec.runtimes.reference import onnxruntime_session

    session = onnxruntime_session(model.graph, threads=threads)
    feed = {session.get_inputs()[0].name: x}

    def run(count: int) -> list[float]:
        session.run(None, feed)
        return _wall_ms(lambda: session.run(None, feed), count)

    return Runner("ONNX Runtime", run), session.run(None, feed)[0]


def edgec_runner(name: str, model, x: np.ndarray, want: np.ndarray, directory: Path, **options) -> Runner:
    import edgec
    from edgec.runtimes.local import LocalRunner

    start = time.perf_counter()
    result = edgec.compile(model, "x86", directory, verify=False, **options)
    compile_s = time.perf_counter() - start
    local = LocalRunner(result.artifact)
    from edgec.core.numerics import compare

    agreement = compare(local.run([x]), [want], rtol=RTOL, atol=ATOL)  # edgec's one rule (edgec/core/numerics.py)
    check = f"{'ok' if agreement.ok else 'MISMATCH'} (max abs err {agreement.max_abs:.1e})"

    def run(count: int) -> list[float]:
        return local.time_ms([x], repeat=count, warmup=1)

    return Runner(name, run, compile_s=compile_s, check=check, schedules=result.manifest.get("schedules", {}))


def measure(runners: list[Runner], rounds: int, repeat: int) -> None:
    for runner in runners:  # warm-up and a first estimate of each runner's speed
        runner.first_ms = float(np.median(runner.run_ms(2)))
    for _ in range(rounds):
        for runner in runners:
            time.sleep(PAUSE_S)
            first = runner.first_ms
            count = repeat if first * repeat <= SLOW_BLOCK_MS else max(2, int(SLOW_BLOCK_MS // first))
            block = runner.run_ms(count)
            runner.samples += block
            runner.round_medians.append(float(np.median(block)))


def paired_ratio(runner: Runner, reference: Runner) -> float:
    """Median over rounds of (runner's median / reference's median in the same round): the
    machine's load drifts over minutes, so ratios are taken within a round, then summarised."""
    ratios = [a / b for a, b in zip(runner.round_medians, reference.round_medians, strict=True)]
    return float(np.median(ratios))


def bench_model(name: str, args, work: Path) -> dict:
    import edgec
    import models

    module = models.MODELS[name](seed=0)
    source = models.save_torchscript(name, work / f"{name}.pt")
    model = edgec.load(source, input_shape=models.INPUT_SHAPE)
    x = np.random.default_rng(0).standard_normal(models.INPUT_SHAPE, dtype=np.float32)
    ort, want = ort_runner(model, x, args.threads)
    runners = [torch_runner(module, x), ort]
    runners.append(edgec_runner("edgec default Relax", model, x, want, work / f"{name}_default", schedules=False))
    runners.append(edgec_runner("edgec schedules", model, x, want, work / f"{name}_schedules", schedules=True))
    if args.tune_trials or args.tuning_db:
        from edgec.tune import tune

        def progress(line: str) -> None:
            print("  tune:", line, file=sys.stderr)

        database = Path(args.tuning_db) if args.tuning_db else work / "tuning"
        tune_s = None
        if args.tune_trials:
            start = time.perf_counter()
            tune(model, "x86", trials=args.tune_trials, database=database, threads=args.threads, report=progress)
            tune_s = time.perf_counter() - start
        tuned = edgec_runner("edgec tuned", model, x, want, work / f"{name}_tuned", schedules=True, tuning_db=database)
        tuned.tune_s = tune_s
        runners.append(tuned)
    print(f"{name}: measuring {len(runners)} runners, {args.rounds} rounds", file=sys.stderr)
    measure(runners, args.rounds, args.repeat)
    return {"model": name, "runners": runners, "ort": ort}


def table(results: list[dict], args) -> str:
    lines = [
        f"threads {args.threads}, {args.rounds} rounds x {args.repeat} runs, interleaved; median ms over all runs; "
        "vs ORT = median over rounds of the ratio of round medians; "
        f"numerics vs ONNX Runtime (rtol=atol={RTOL:g})",
        "",
        "| model | runner | median ms | vs ORT | compile s | tune s | numerics | kernels |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for result in results:
        ort = result["ort"]
        for runner in result["runners"]:
            compile_s = f"{runner.compile_s:.1f}" if runner.compile_s is not None else ""
            tune_s = f"{runner.tune_s:.0f}" if runner.tune_s is not None else ""
            lines.append(
                f"| {result['model']} | {runner.name} | {runner.median:.2f} | {paired_ratio(runner, ort):.2f}x | "
                f"{compile_s} | {tune_s} | {runner.check} | {_kernels(runner.schedules)} |"
            )
    return "\n".join(lines)


def _kernels(schedules: dict) -> str:
    """Where an edgec variant's kernels got their schedules, from the manifest."""
    if not schedules:
        return ""
    if schedules.get("tuning_db"):
        return f"{schedules['from_tuning_db']} tuned, {schedules['tuning_db_matched']} with records"
    by_rule = schedules.get("by_rule", {})
    total = sum(by_rule.values())
    return f"{total - by_rule.get('none', 0)}/{total} scheduled"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenet_v2,resnet18,squeezenet1_1")
    parser.add_argument("--threads", type=int, default=None, help="threads for every runtime [default: physical cores]")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tune-trials", type=int, default=0, help="also tune each model with this many trials (slow)")
    parser.add_argument(
        "--tuning-db",
        help="database for --tune-trials [default: a temporary one]; without --tune-trials: measure "
        "'edgec tuned' with this existing database, no tuning",
    )
    parser.add_argument("-o", "--output", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--json", type=Path, help="also write the raw samples here")
    args = parser.parse_args()

    from thread_count import use_threads  # bench/ is sys.path[0] when run as python bench/NAME.py

    args.threads = use_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgec-bench-") as work:
        for name in args.models.split(","):
            results.append(bench_model(name.strip(), args, Path(work)))
    raw = {
        result["model"]: {
            runner.name: {"samples": runner.samples, "compile_s": runner.compile_s, "tune_s": runner.tune_s,
                          "check": runner.check, "schedules": runner.schedules}
            for runner in result["runners"]
        }
        for result in results
    }  # fmt: skip
    publish(table(results, args), args.output, args.json, raw)
    bad = [r for result in results for r in result["runners"] if r.check.startswith("MISMATCH")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
