"""Winograd against direct convolution, one 3x3 layer at a time, on this machine.

For ResNet-18's 3x3 stride-1 layers (Conv + bias + ReLU, batch 1) each variant
is compiled by edgec for x86 and timed on one thread (or ``--threads``):

    direct   winograd=None (the schedule library's direct convolution)
    F(2x2)   WinogradPolicy(tiles=(2,), min_tiles=1)
    F(4x4)   WinogradPolicy(tiles=(4,), min_tiles=1)

and the default policy's choice is shown beside them. Runners are timed
interleaved, round after round (the machine is shared): the table gives each
one's minimum and median over all runs, and each Winograd variant's outputs
are checked against the direct build's (|d| <= atol + rtol max|direct|).

    python bench/winograd.py [--layers 56x64,28x128,14x256,7x512] [--threads 1] [--rounds 5] [--repeat 10]

ARM boards: compare instruction counts of whole builds instead (`edgec
compile --no-winograd`, `edgec profile` on `edgec device emulate`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

RTOL = ATOL = 1e-4


def _layer_model(size: int, channels: int, directory: Path, seed: int = 0) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    module = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()).eval()
    path = directory / f"conv{size}x{channels}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, channels, size, size),), str(path), dynamo=False, opset_version=17)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="56x64,28x128,14x256,7x512", help="SIZExCHANNELS, comma separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import edgec
    from edgec.runtimes.local import LocalRunner
    from edgec.targets import PRESETS
    from edgec.targets.schedules.winograd_graph import DEFAULT_POLICY, WinogradPolicy

    x86 = PRESETS["x86"]
    default = DEFAULT_POLICY.for_target(x86.winograd_min_tiles, x86.winograd_tiles, x86.winograd_transform_cost)

    variants = {
        "direct": None,
        "F(2x2)": WinogradPolicy(tiles=(2,), min_tiles=1),
        "F(4x4)": WinogradPolicy(tiles=(4,), min_tiles=1),
    }
    print(f"| layer | {' | '.join(f'{name} min / median ms' for name in variants)} | max error vs direct | default policy |")
    print(f"|---|{'---:|' * len(variants)}---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for layer in args.layers.split(","):
            size, channels = (int(part) for part in layer.split("x"))
            model = edgec.load(_layer_model(size, channels, Path(tmp)))
            runners = {}
            for name, policy in variants.items():
                result = edgec.compile(model, "x86", Path(tmp) / f"{layer}-{name}", verify=False, winograd=policy)
                runners[name] = LocalRunner(result.artifact)
            x = np.random.default_rng(0).standard_normal((1, channels, size, size)).astype("float32")
            outputs = {name: runner.run([x])[0] for name, runner in runners.items()}
            reference = outputs["direct"]
            error = max(float(np.abs(out - reference).max()) for out in outputs.values())
            tolerance = ATOL + RTOL * float(np.abs(reference).max())
            samples: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(args.rounds):
                for name, runner in runners.items():
                    samples[name] += runner.time_ms([x], repeat=args.repeat)
            m, why = default.choose(1, size, size, channels, channels)
            chosen = f"F({m}x{m})" if m else "direct"
            cells = " | ".join(f"{min(s):.3f} / {float(np.median(s)):.3f}" for s in samples.values())
            verdict = "ok" if error <= tolerance else f"WRONG (> {tolerance:.2e})"
            print(f"| {size}x{size}x{channels} | {cells} | {error:.2e} {verdict} | {chosen} ({why}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
