"""Latency of compiled models before and after a channel-reducing pass, side by side.

For a MobileNetV2 (examples/mobilenet_v2.py, width 1.0, 224x224) and a
ResNet-18 (standard BasicBlock layout, defined here; seeded weights, BN
statistics calibrated on seeded random batches), this script:

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
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import edgec
from edgec.passes import FuseFiltersPass
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import onnxruntime_session
from edgec.stats import model_stats

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 224


# --------------------------------------------------------------------------
# ResNet-18 (He et al. 2016), the torchvision layout
# --------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, channels = [], 64
        for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(channels, outputs, stride), BasicBlock(outputs, outputs, 1)))
            channels = outputs
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet18(seed: int = 0) -> ResNet18:
    """Seeded Kaiming weights; BN affine parameters random, statistics measured on seeded random batches."""
    torch.manual_seed(seed)
    model = ResNet18()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, RESOLUTION, RESOLUTION, generator=generator))
    return model.eval()


def build_mobilenet_v2():
    spec = importlib.util.spec_from_file_location("mobilenet_v2", ROOT / "examples" / "mobilenet_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(width=1.0, resolution=RESOLUTION)


BUILDERS = {"mobilenet_v2": build_mobilenet_v2, "resnet18": build_resnet18}


# --------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------


def compile_variants(name: str, ratio: float, temperature: float, workdir: Path) -> list[dict]:
    """Dense and fused artifacts of one model, each with its stats."""
    path = workdir / f"{name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(BUILDERS[name]()), str(path))
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


def time_interleaved(variants: list[dict], inputs: list[np.ndarray], rounds: int, repeat: int) -> None:
    """Alternate the variants round by round; each round takes ``repeat`` timed runs of each."""
    runners = [LocalRunner(variant["artifact"]) for variant in variants]
    session = onnxruntime_session(variants[0]["graph"], threads=int(os.environ["TVM_NUM_THREADS"]))
    feed = {value.name: array for value, array in zip(session.get_inputs(), inputs, strict=True)}
    for _ in range(2):  # warm up ONNX Runtime
        session.run(None, feed)
    samples: list[list[float]] = [[] for _ in range(len(variants) + 1)]
    for _ in range(rounds):
        for index, runner in enumerate(runners):
            samples[index].extend(runner.time_ms(inputs, repeat=repeat))
        for _ in range(repeat):
            start = time.perf_counter()
            session.run(None, feed)
            samples[-1].append((time.perf_counter() - start) * 1e3)
    for variant, times in zip(variants, samples, strict=False):
        variant["median_ms"] = statistics.median(times)
    variants.append({**{key: variants[0][key] for key in ("model", "macs", "params", "bytes")},
                     "variant": "ONNX Runtime dense", "median_ms": statistics.median(samples[-1])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(BUILDERS), default=["mobilenet_v2", "resnet18"])
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
            time_interleaved(variants, inputs, args.rounds, args.repeat)
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
