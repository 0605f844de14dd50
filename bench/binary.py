"""Binary and ternary layers against float32, side by side in one run (x86).

Variants, each compiled by ``edgec.compile`` for x86 in this run (verified
against its reference) and timed interleaved round by round, so that load
from other processes hits every variant alike:

    fp32 edgec        the float32 layer / model as edgec compiles it today
    binary edgec      ``-p binary``: Sign -> Conv becomes edgec.BinaryConv with
                      binary activations (bit packing + xnor/popcount kernels)
    binary weight-only  ``-p binary`` on the layer without the Sign: float
                      activations, 1-bit weights decoded at run time
    ternary edgec     ``-p ternary``: 2-bit weights decoded at run time
                      (weight-only), float activations
    ORT fp32          ONNX Runtime on the float32 graph (all graph optimisations)

Layers: the 3x3 convolutions of a ResNet-18-shaped BNN, ``64->64 at 56x56``,
``256->256 at 14x14``, ``512->512 at 7x7`` (stride 1, pad 1, batch 1, with a
bias). Their weights are ``+-a`` per output channel (binary) or ``{-a, 0,
+a}`` (ternary, about a third zeros), so every lowering is exact. The fp32
and ORT layers take the float input directly; the binary layer also
binarises it (the Sign is inside its packing kernel).

End to end: a ResNet-18-shaped BNN at 224x224 (Bi-Real-Net layout: a float
7x7 stem, 16 binary 3x3 convolutions each reading ``Sign`` of its block
input with a BatchNorm and a float residual, float 1x1 downsample
shortcuts, a float classifier), seeded weights, BN statistics calibrated on
random batches. ``fold-bn`` runs first in every edgec variant; ``ternary``
lowers the same 16 convolutions to 2-bit weights (weight-only).

    python bench/binary.py                           # layers and end to end
    python bench/binary.py --no-model --rounds 7 --repeat 20

Reports, per variant: median and minimum ms with their speedups over fp32
edgec (the minimum is less sensitive to other processes on a shared
machine), and weight bytes (the initializers of the graph: packed bits +
scales + the float layers) and the size of lib.so.
Targets of the issue: binary 3x3 layers >= 8x faster than fp32 edgec; weights
32x (binary) and 16x (ternary) smaller up to the scales; weight-only layers
no slower than fp32.
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
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper
from timing import edgec_timer, interleave, onnxruntime_timer

import edgec
from edgec.passes import FoldBatchNormPass, LowerBinaryPass, LowerTernaryPass
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import onnxruntime_session
from edgec.core.stats import model_stats

LAYERS = ((64, 56), (256, 14), (512, 7))
RESOLUTION = 224


# --------------------------------------------------------------------------
# Single layers
# --------------------------------------------------------------------------


def coded_weight(channels: int, rng: np.random.Generator, ternary: bool) -> np.ndarray:
    """``(C, C, 3, 3)`` float32 weights ``+-a_o`` (or ``{-a_o, 0, +a_o}``) with random ``a_o``."""
    codes = np.where(rng.standard_normal((channels, channels, 3, 3)) < 0, -1.0, 1.0)
    if ternary:
        codes *= rng.random(codes.shape) > 0.33
    scale = rng.uniform(0.01, 0.1, (channels, 1, 1, 1))
    return (codes * scale).astype(np.float32)


def layer_graph(channels: int, size: int, weight: np.ndarray, bias: np.ndarray, sign: bool) -> ir.Model:
    nodes = [helper.make_node("Sign", ["x"], ["x_sign"], name="sign")] if sign else []
    nodes.append(helper.make_node("Conv", ["x_sign" if sign else "x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]))
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, size, size])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def layer_variants(channels: int, size: int, workdir: Path) -> list[dict]:
    rng = np.random.default_rng(channels)
    binary = coded_weight(channels, rng, ternary=False)
    ternary = coded_weight(channels, rng, ternary=True)
    bias = rng.standard_normal(channels).astype(np.float32)
    name = f"conv {channels}->{channels} {size}x{size}"
    plans = [
        ("fp32 edgec", layer_graph(channels, size, binary, bias, sign=False), []),
        ("binary edgec", layer_graph(channels, size, binary, bias, sign=True), [LowerBinaryPass()]),
        ("binary weight-only", layer_graph(channels, size, binary, bias, sign=False), [LowerBinaryPass()]),
        ("ternary edgec", layer_graph(channels, size, ternary, bias, sign=False), [LowerTernaryPass()]),
    ]
    return [compile_variant(name, variant, edgec.from_onnx_ir(graph), passes, workdir) for variant, graph, passes in plans]


def compile_variant(name: str, variant: str, model, passes: list, workdir: Path) -> dict:
    if passes:
        reports = edgec.apply(model, passes, measure=False)
        if not reports[-1].modified:
            raise SystemExit(f"{variant}: {reports[-1].name} did not lower {name}")
    start = time.perf_counter()
    result = edgec.compile(model, "x86", workdir / f"{len(list(workdir.iterdir()))}", verify=True)
    print(
        f"  compiled {name} / {variant} in {time.perf_counter() - start:.0f} s "
        f"(verification: {result.manifest['verification']['status']})",
        file=sys.stderr,
        flush=True,
    )
    stats = model_stats(model.graph)
    return {
        "name": name, "variant": variant, "graph": model.graph, "artifact": result.artifact,
        "bytes": stats.size_bytes, "lib_bytes": (result.artifact.path / "lib.so").stat().st_size,
        "kernels": [call["kernel"] for call in result.manifest["kernels"]],
    }  # fmt: skip


# --------------------------------------------------------------------------
# A ResNet-18-shaped BNN (Bi-Real-Net layout)
# --------------------------------------------------------------------------


def build_bnn_resnet18(seed: int = 0):
    import torch
    from torch import nn

    class BinaryConv(nn.Conv2d):
        """Weights ``sign(W) * mean|W|`` per output channel (XNOR-Net/RBNN style), input binarised by Sign."""

        def forward(self, x):
            weight = self.weight
            scale = weight.abs().mean(dim=(1, 2, 3), keepdim=True)
            binary = torch.where(weight >= 0, 1.0, -1.0) * scale
            return nn.functional.conv2d(torch.sign(x), binary, None, self.stride, self.padding)

    class Block(nn.Module):
        def __init__(self, inputs: int, outputs: int, stride: int):
            super().__init__()
            self.conv1 = BinaryConv(inputs, outputs, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(outputs)
            self.conv2 = BinaryConv(outputs, outputs, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(outputs)
            self.shortcut = nn.Identity()
            if stride != 1 or inputs != outputs:
                self.shortcut = nn.Sequential(
                    nn.AvgPool2d(2), nn.Conv2d(inputs, outputs, 1, bias=False), nn.BatchNorm2d(outputs)
                )

        def forward(self, x):
            y = self.bn1(self.conv1(x)) + self.shortcut(x)
            return self.bn2(self.conv2(y)) + y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            )
            layers, channels = [], 64
            for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers += [Block(channels, outputs, stride), Block(outputs, outputs, 1)]
                channels = outputs
            self.body = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, 1000)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.body(self.stem(x))), 1))

    torch.manual_seed(seed)
    return models.calibrate(Net(), seed)


def model_variants(workdir: Path) -> list[dict]:
    import torch

    path = workdir / "bnn_resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            build_bnn_resnet18(), (torch.randn(1, 3, RESOLUTION, RESOLUTION),), str(path),
            dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
        )  # fmt: skip
    name = "BNN ResNet-18 224x224"
    plans = [
        ("fp32 edgec", [FoldBatchNormPass()]),
        ("binary edgec", [FoldBatchNormPass(), LowerBinaryPass()]),
        ("ternary edgec", [FoldBatchNormPass(), LowerTernaryPass()]),
    ]
    return [compile_variant(name, variant, edgec.load(path), passes, workdir) for variant, passes in plans]


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def time_interleaved(variants: list[dict], rounds: int, repeat: int, threads: int, seed: int = 0) -> list[dict]:
    """Median ms of each variant (and of ORT on the first, float32, graph), interleaved round by round."""
    graph = variants[0]["graph"]
    shape = [int(dim) for dim in graph.graph.inputs[0].shape]
    inputs = [np.random.default_rng(seed).standard_normal(shape).astype(np.float32)]
    timers = {index: edgec_timer(LocalRunner(variant["artifact"]), inputs, repeat) for index, variant in enumerate(variants)}
    session = onnxruntime_session(graph, threads=threads)
    timers["ort"] = onnxruntime_timer(session, {session.get_inputs()[0].name: inputs[0]}, repeat, warmup=3)
    samples = interleave(timers, rounds)
    for index, variant in enumerate(variants):
        variant["median_ms"] = statistics.median(samples[index])
        variant["min_ms"] = min(samples[index])
    ort = {
        "name": variants[0]["name"], "variant": "ORT fp32", "bytes": variants[0]["bytes"], "lib_bytes": None,
        "median_ms": statistics.median(samples["ort"]), "min_ms": min(samples["ort"]),
    }  # fmt: skip
    return [*variants, ort]


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'layer / model':<26} {'variant':<20} {'median ms':>10} {'vs fp32':>8} {'min ms':>9} {'vs fp32':>8} "
        f"{'weight bytes':>13} {'smaller':>8} {'lib.so':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        base = next(other for other in rows if other["name"] == row["name"] and other["variant"] == "fp32 edgec")
        lib = f"{row['lib_bytes'] / 1024:>8.0f} K" if row["lib_bytes"] else f"{'':>10}"
        print(
            f"{row['name']:<26} {row['variant']:<20} {row['median_ms']:>10.3f} "
            f"{base['median_ms'] / row['median_ms']:>7.2f}x {row['min_ms']:>9.3f} {base['min_ms'] / row['min_ms']:>7.2f}x "
            f"{row['bytes']:>13,d} "
            f"{base['bytes'] / row['bytes']:>7.1f}x {lib}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per variant per round (layers)")
    parser.add_argument("--model-repeat", type=int, default=5, help="timed runs per variant per round (model)")
    parser.add_argument("--no-model", action="store_true", help="layers only, no end-to-end ResNet-18")
    parser.add_argument("--no-layers", action="store_true", help="end to end only")
    parser.add_argument("--threads", type=int, default=None, help="kernel threads for every runtime [default: physical cores]")
    args = parser.parse_args()
    from thread_count import use_threads  # bench/ is sys.path[0] when run as python bench/NAME.py

    args.threads = use_threads(args.threads)

    from edgec.targets.vector import cpu_vector

    vector = cpu_vector(None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgec-bench-binary-") as tmp:
        workdir = Path(tmp)
        if not args.no_layers:
            for channels, size in LAYERS:
                rows += time_interleaved(layer_variants(channels, size, workdir), args.rounds, args.repeat, args.threads)
        if not args.no_model:
            rows += time_interleaved(model_variants(workdir), args.rounds, args.model_repeat, args.threads)
    print_table(rows)
    print(
        f"\n{args.rounds} interleaved rounds x {args.repeat} (layers) / {args.model_repeat} (model) runs per variant, "
        f"batch 1; x86 ({vector.word_bits}-bit words, {vector.lanes_of(vector.word_dtype)} per vector, popcount: {vector.popcount}); "
        f"{args.threads} kernel threads for edgec and ORT; ORT with all graph optimisations; weight bytes = graph initializers."
    )


if __name__ == "__main__":
    main()
