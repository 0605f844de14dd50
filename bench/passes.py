"""Latency of compiled models before and after a channel-reducing pass, side by side.

For a MobileNetV2 and a ResNet-18 of bench/models.py (224x224, seeded
weights, BN statistics calibrated on seeded random batches), this script:

1. saves the model as TorchScript and loads it with ``edgec.load``;
2. compiles it for x86 (dense), applies ``fuse-filters`` at ``--ratio`` to a
   second copy and compiles that too (both verified against ONNX Runtime);
3. times both artifacts with ``LocalRunner.time_ms`` and the dense ONNX with
   ONNX Runtime, interleaved round by round so that load from other
   processes hits every variant alike;
4. prints one table: model, variant, MACs, params, weight bytes, median ms,
   speedup over the dense edgec build.

    python bench/passes.py                        # both models, ratio 0.5
    python bench/passes.py --models resnet18 --rounds 5 --repeat 10

Weights are random, so only structure and speed mean anything here (no
accuracy). The timings are edgec's default build (schedule library, no
MetaSchedule tuning), on whatever cores this machine has.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import models
import numpy as np
import torch
from timing import edgec_timer, interleave, onnxruntime_timer

import edgec
from edgec.passes import FuseFiltersPass
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import onnxruntime_session
from edgec.core.stats import model_stats

RESOLUTION = models.INPUT_SHAPE[-1]


# --------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------


def compile_variants(name: str, ratio: float, temperature: float, workdir: Path) -> list[dict]:
    """Dense and fused artifacts of one model, each with its stats."""
    path = workdir / f"{name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(models.build(name)), str(path))
    shape = (1, 3, RESOLUTION, RESOLUTION)
    variants = []
    for variant in ("dense", f"fuse-filters {ratio:g}"):
        model = edgec.load(path, input_shape=shape)
        if variant != "dense":
            (report,) = edgec.apply(model, [FuseFiltersPass(ratio=ratio, temperature=temperature)], measure=False)
            if not report.modified:
                raise SystemExit(f"fuse-filters did not change {name}")
        start = time.perf_counter()
        result = edgec.compile(model, "x86", workdir / f"{name}_{len(variants)}", verify=True)
        print(f"  compiled {name} {variant} in {time.perf_counter() - start:.0f} s "
              f"(verification: {result.manifest['verification']['status']})", file=sys.stderr, flush=True)
        stats = model_stats(model.graph)
        variants.append(
            {"model": name, "variant": f"edgec {variant}", "graph": model.graph, "artifact": result.artifact,
             "macs": stats.macs, "params": stats.params, "bytes": stats.size_bytes}
        )
    return variants


def time_interleaved(variants: list[dict], inputs: list[np.ndarray], rounds: int, repeat: int, threads: int) -> None:
    """Alternate the variants round by round; each round takes ``repeat`` timed runs of each."""
    timers = {index: edgec_timer(LocalRunner(variant["artifact"]), inputs, repeat) for index, variant in enumerate(variants)}
    session = onnxruntime_session(variants[0]["graph"], threads=threads)
    timers["ort"] = onnxruntime_timer(session, {value.name: array for value, array in zip(session.get_inputs(), inputs, strict=True)}, repeat)
    samples = interleave(timers, rounds)
    for index, variant in enumerate(variants):
        variant["median_ms"] = statistics.median(samples[index])
    variants.append({**{key: variants[0][key] for key in ("model", "macs", "params", "bytes")},
                     "variant": "ONNX Runtime dense", "median_ms": statistics.median(samples["ort"])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(models.MODELS), default=["mobilenet_v2", "resnet18"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=FuseFiltersPass().temperature, help="[default: the pass's]")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per variant per round")
    parser.add_argument("--threads", type=int, default=None, help="kernel threads for every runtime [default: physical cores]")
    args = parser.parse_args()
    from thread_count import use_threads  # bench/ is sys.path[0] when run as python bench/NAME.py

    args.threads = use_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgec-bench-") as tmp:
        for name in args.models:
            variants = compile_variants(name, args.ratio, args.temperature, Path(tmp))
            inputs = [np.random.default_rng(0).standard_normal((1, 3, RESOLUTION, RESOLUTION)).astype(np.float32)]
            time_interleaved(variants, inputs, args.rounds, args.repeat, args.threads)
            rows.extend(variants)
    header = f"{'model':<13} {'variant':<24} {'MACs':>8} {'params':>8} {'weight bytes':>13} {'median ms':>10} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        base = next(other for other in rows if other["model"] == row["model"] and other["variant"] == "edgec dense")
        print(
            f"{row['model']:<13} {row['variant']:<24} {row['macs'] / 1e6:>7.0f}M {row['params'] / 1e6:>7.2f}M "
            f"{row['bytes'] / 2**20:>10.2f} MiB {row['median_ms']:>10.1f} {base['median_ms'] / row['median_ms']:>7.2f}x"
        )
    print(f"\n{args.rounds} interleaved rounds x {args.repeat} runs per variant; {args.threads} threads; batch 1, {RESOLUTION}x{RESOLUTION}; "
          f"edgec x86 (schedule library, untuned) and ONNX Runtime (all graph optimisations) on the same machine; "
          f"fuse-filters ratio {args.ratio:g}, temperature {args.temperature:g}.")


if __name__ == "__main__":
    main()
