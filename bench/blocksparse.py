"""1xN block-sparse packing (``block-sparse`` pass): latency, packed size and accuracy.

Three parts, each measured side by side in one run:

1. layers   every distinct pointwise (1x1) conv of a MobileNetV2 (width 1.0,
            224x224) and the 1x1 downsample convs of a ResNet-18, as
            one-layer models (Conv 1x1 + bias + ReLU6): the dense edgec kernel
            (CPU schedule library) against the BlockSparseConv kernel at
            sparsity 0.5 / 0.7 and N = 4 / 8 / 16, on seeded random weights.
            Only the conv kernel is timed (TVM's time evaluator on the
            function in lib.so; the dense one on random inputs, the sparse one
            on its own packed arrays), not the transposes a one-layer NCHW
            model has at its edges.
2. models   MobileNetV2 and ResNet-18 end to end: dense edgec, ONNX Runtime
            (dense, all graph optimisations, same thread count), and the
            block-sparse model at each (sparsity, N) compiled by edgec. Each
            sparse artifact is checked against the masked dense model (the
            pass with pack=false) under ONNX Runtime before it is timed.
3. accuracy (--parts accuracy) the digits CNN (scikit-learn's 8x8 digits,
            a small CNN trained here with torch): accuracy against sparsity
            for N = 4 with and without filter rearrangement, one-shot and
            after a short masked fine-tuning (the paper prunes then trains),
            over --seeds runs, with the paired rearranged-minus-plain
            difference (one seed: one split, initial model, batch order).

Timings interleave the variants round by round (the order shuffled per
round) so that load from other processes hits each alike; the tables give
medians and ratios measured in the same run.

    python bench/blocksparse.py                                 # layers + models
    python bench/blocksparse.py --parts accuracy --seeds 20
    python bench/blocksparse.py --models mobilenet_v2 --rounds 9 --json out.json
    python bench/blocksparse.py --parts layers --blocks 4 16 --sparsities 0.7 --threads 1

Weights are random (MobileNetV2 / ResNet-18 parts): speed and size only.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import statistics
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path

import models
import numpy as np
from timing import edgec_timer, interleave, onnxruntime_timer

RESOLUTION = models.INPUT_SHAPE[-1]
SPARSITIES = (0.5, 0.7)
BLOCKS = (4, 8, 16)
_COUNTER = itertools.count()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Models (bench/models.py)
# --------------------------------------------------------------------------


def export_onnx(module, path: Path, shape) -> Path:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(*shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])  # fmt: skip
    return path


def packed_bytes(graph) -> tuple[int, int]:
    """(dense weight bytes of the packed layers' originals, bytes of their packed arrays + bias)."""
    from edgec.ops import DOMAIN

    dense = packed = 0
    for node in graph.graph:
        if node.domain == DOMAIN and node.op_type.startswith("BlockSparse"):
            values, indices, indptr, bias = (node.inputs[i].const_value.numpy() for i in range(1, 5))
            in_channels = None
            shape = node.inputs[0].shape
            if shape is not None and isinstance(shape[1], int):
                in_channels = int(shape[1])
            out_channels = (indptr.size - 1) * values.shape[1]
            window = int(np.prod(values.shape[2:])) if values.ndim > 2 else 1
            if in_channels:
                dense += out_channels * in_channels * window * 4 + bias.nbytes
            packed += values.nbytes + indices.nbytes + indptr.nbytes + bias.nbytes
    return dense, packed


# --------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------


def kernel_timer(artifact, kernel: str, arrays: list[np.ndarray], repeat: int):
    """A timer of one kernel of lib.so on ``arrays`` (its arguments, then its outputs)."""
    import tvm

    module = tvm.runtime.load_module(str(artifact.lib))
    device = tvm.cpu()
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(array), device) for array in arrays]
    name = f"edgec.bench.kernel.{next(_COUNTER)}"  # as edgec profile does: the kernel as a global function
    tvm.register_global_func(name, module.get_function(kernel, query_imports=True), override=True)
    evaluator = tvm.get_global_func("runtime.RPCTimeEvaluator")
    timer = evaluator(None, name, 1, 0, 1, repeat, 0, 100, 0, 1, 0, "")  # cpu 0, number 1
    timer(*tensors)  # warm up

    def run() -> list[float]:
        return [seconds * 1e3 for seconds in struct.unpack("@" + "d" * repeat, bytes(timer(*tensors)))]

    run.keep = (module, tensors)  # type: ignore[attr-defined]
    return run


# --------------------------------------------------------------------------
# Part 1: pointwise layers
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pointwise:
    model: str
    inputs: int
    outputs: int
    size: int  # H = W
    stride: int
    count: int  # how many layers of the model have this shape


def pointwise_layers(names: list[str]) -> list[Pointwise]:
    """Distinct 1x1 convs (group 1) of the models, from their ONNX graphs, with multiplicity."""
    import onnx

    found: dict[tuple, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = export_onnx(models.build(name), Path(tmp) / f"{name}.onnx", (1, 3, RESOLUTION, RESOLUTION))
            proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
            shapes = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim] for value in proto.graph.value_info}
            shapes["x"] = [1, 3, RESOLUTION, RESOLUTION]
            weights = {init.name: init.dims for init in proto.graph.initializer}
            for node in proto.graph.node:
                if node.op_type != "Conv":
                    continue
                dims = list(weights[node.input[1]])
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                stride = next((list(a.ints) for a in node.attribute if a.name == "strides"), [1, 1])[0]
                if dims[2:] == [1, 1] and group == 1:
                    key = (name, dims[1], dims[0], shapes[node.input[0]][2], stride)
                    found[key] = found.get(key, 0) + 1
    return [Pointwise(*key, count) for key, count in found.items()]


def layer_model(layer: Pointwise, seed: int):
    """Conv 1x1 (+bias) + ReLU6 as an ONNX IR model, seeded Kaiming-like weights."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((layer.outputs, layer.inputs, 1, 1)) * np.sqrt(2 / layer.inputs)).astype(np.float32)
    bias = rng.uniform(-0.1, 0.1, layer.outputs).astype(np.float32)
    out = (layer.size - 1) // layer.stride + 1
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="pw", strides=[layer.stride] * 2),
         helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="relu6")],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, layer.inputs, layer.size, layer.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, layer.outputs, out, out])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"),
         numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def main_kernel(artifact, prefix: str) -> dict:
    calls = [call for call in artifact.manifest["kernels"] if call["kernel"].startswith(prefix) or prefix in call["kernel"]]
    if len(calls) != 1:
        raise SystemExit(f"expected one {prefix} kernel in {artifact.path}, got {[c['kernel'] for c in artifact.manifest['kernels']]}")
    return calls[0]


def bench_layers(names: list[str], rounds: int, repeat: int, workdir: Path, sparsities=SPARSITIES, blocks=BLOCKS) -> list[dict]:
    import edgec
    from edgec.passes import PackBlockSparsePass

    rows = []
    for index, layer in enumerate(pointwise_layers(names)):
        rng = np.random.default_rng(index)
        timers, info = {}, {}
        dense = edgec.compile(edgec.from_onnx_ir(layer_model(layer, index)), "x86", workdir / f"layer{index}_dense")
        call = main_kernel(dense.artifact, "conv2d")
        arrays = [rng.standard_normal(spec["shape"]).astype(spec["dtype"]) for spec in call["args"] + call["outputs"]]
        timers["dense"] = kernel_timer(dense.artifact, call["kernel"], arrays, repeat)
        for sparsity in sparsities:
            for n in blocks:
                if layer.outputs % n:
                    continue
                model = edgec.from_onnx_ir(layer_model(layer, index))
                edgec.apply(model, [PackBlockSparsePass(n=n, sparsity=sparsity, rearrange=False)], measure=False)
                result = edgec.compile(model, "x86", workdir / f"layer{index}_{sparsity}_{n}")
                assert result.manifest["verification"]["status"] == "passed"
                call = main_kernel(result.artifact, "edgec_block_sparse_conv")
                node = next(node for node in model.graph.graph if node.op_type == "BlockSparseConv")
                values, indices, indptr, bias = (node.inputs[i].const_value.numpy() for i in range(1, 5))
                x = rng.standard_normal(call["args"][0]["shape"]).astype(np.float32)
                y = np.zeros(call["outputs"][0]["shape"], np.float32)
                packed = [x, values.transpose(0, 2, 3, 1), indices, indptr, bias, y]  # as the lowering passes them
                key = f"s{sparsity}/n{n}"
                timers[key] = kernel_timer(result.artifact, call["kernel"], packed, repeat)
                info[key] = values.nbytes + indices.nbytes + indptr.nbytes
        medians = {key: statistics.median(times) for key, times in interleave(timers, rounds, shuffle_seed=index).items()}
        row = {**dataclasses.asdict(layer), "dense_ms": medians["dense"], "dense_bytes": layer.inputs * layer.outputs * 4}
        for key, ms in medians.items():
            if key != "dense":
                row[key] = {"ms": ms, "speedup": medians["dense"] / ms, "packed_bytes": info[key]}
        rows.append(row)
        log(f"  layer {layer.inputs}->{layer.outputs} @{layer.size}/{layer.stride}: dense {medians['dense']:.4f} ms; "
            + ", ".join(f"{key} {row[key]['speedup']:.2f}x" for key in medians if key != "dense"))  # fmt: skip
    return rows


def print_layers(rows: list[dict], sparsities=SPARSITIES, blocks=BLOCKS) -> None:
    keys = [f"s{s}/n{n}" for s in sparsities for n in blocks]
    print("\n### Pointwise convs: kernel latency, dense edgec vs block-sparse edgec (median ms, speedup)\n")
    print("| model | C_in->C_out @HxW /stride (count) | dense ms | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{row[k]['ms']:.4f} ({row[k]['speedup']:.2f}x)" if k in row else "-" for k in keys]
        print(f"| {row['model']} | {row['inputs']}->{row['outputs']} @{row['size']} /{row['stride']} ({row['count']}) "
              f"| {row['dense_ms']:.4f} | " + " | ".join(cells) + " |")  # fmt: skip
    print("\nGeometric mean speedup over the layers (weighted by count):")
    for key in keys:
        speedups = [(row[key]["speedup"], row["count"]) for row in rows if key in row]
        total = sum(count for _, count in speedups)
        mean = float(np.exp(sum(np.log(s) * c for s, c in speedups) / total)) if total else float("nan")
        worst = min(s for s, _ in speedups) if speedups else float("nan")
        print(f"  {key}: geomean {mean:.2f}x, min {worst:.2f}x over {len(speedups)} shapes")


# --------------------------------------------------------------------------
# Part 2: whole models
# --------------------------------------------------------------------------


def bench_models(names: list[str], rounds: int, repeat: int, workdir: Path, kinds: tuple[str, ...], threads: int,
                 sparsities=SPARSITIES, blocks=BLOCKS) -> list[dict]:
    import edgec
    from edgec.core.numerics import compare
    from edgec.passes import PackBlockSparsePass
    from edgec.runtimes.local import LocalRunner
    from edgec.runtimes.reference import onnxruntime_session, run_onnxruntime
    from edgec.core.stats import model_stats

    rows = []
    for name in names:
        path = export_onnx(models.build(name), workdir / f"{name}.onnx", (1, 3, RESOLUTION, RESOLUTION))
        x = np.random.default_rng(0).standard_normal((1, 3, RESOLUTION, RESOLUTION)).astype(np.float32)
        timers, info = {}, {}
        start = time.perf_counter()
        dense = edgec.compile(edgec.load(path), "x86", workdir / f"{name}_dense", verify=False)
        log(f"  {name} dense: compiled in {time.perf_counter() - start:.0f} s")
        runner = LocalRunner(dense.artifact)
        timers["edgec dense"] = edgec_timer(runner, [x], repeat, warmup=1)
        base = edgec.load(path)
        info["edgec dense"] = {"weight_bytes": model_stats(base.graph).size_bytes, "max_abs_vs_reference": None}
        session = onnxruntime_session(base.graph, threads=threads)
        timers["ONNX Runtime dense"] = onnxruntime_timer(session, {"x": x}, repeat, warmup=1)
        info["ONNX Runtime dense"] = info["edgec dense"]
        for sparsity in sparsities:
            for n in blocks:
                key = f"edgec block-sparse s={sparsity} N={n}"
                options = {"n": n, "sparsity": sparsity, "kinds": kinds}
                masked = edgec.load(path)
                edgec.apply(masked, [PackBlockSparsePass(**options, pack=False)], measure=False)
                model = edgec.load(path)
                (report,) = edgec.apply(model, [PackBlockSparsePass(**options)], measure=False)
                start = time.perf_counter()
                result = edgec.compile(model, "x86", workdir / f"{name}_{sparsity}_{n}", verify=False)
                runner = LocalRunner(result.artifact)
                agreement = compare(runner.run([x]), run_onnxruntime(masked.graph, [x]), rtol=1e-3, atol=1e-3)
                error = agreement.max_abs
                if not agreement.ok:
                    raise SystemExit(f"{name} {key}: lib.so differs from the masked dense model: {agreement.detail}")
                dense_bytes, packed = packed_bytes(model.graph)
                layers = sum(1 for node in model.graph.graph if node.op_type.startswith("BlockSparse"))
                info[key] = {"weight_bytes": report.size_after, "packed_layers": layers, "packed_bytes": packed,
                             "dense_bytes_of_packed_layers": dense_bytes, "max_abs_vs_reference": error}  # fmt: skip
                log(f"  {name} {key}: {layers} layers packed, compiled in {time.perf_counter() - start:.0f} s, "
                    f"max |lib.so - masked dense ORT| = {error:.2e}")  # fmt: skip
                timers[key] = edgec_timer(runner, [x], repeat, warmup=1)
        medians = {key: statistics.median(times) for key, times in interleave(timers, rounds, shuffle_seed=0).items()}
        for key, ms in medians.items():
            rows.append({"model": name, "variant": key, "median_ms": ms, "vs_edgec_dense": medians["edgec dense"] / ms,
                         "vs_onnxruntime": medians["ONNX Runtime dense"] / ms, **info[key]})  # fmt: skip
    return rows


def print_models(rows: list[dict], threads: int) -> None:
    print(f"\n### End to end (batch 1, 224x224, {threads} threads): median ms and speedups, same run\n")
    print("| model | variant | median ms | speedup vs edgec dense | vs ONNX Runtime | weights MB | packed layers: dense -> packed MB | max abs err |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        packed = (f"{row.get('packed_layers', 0)}: {row['dense_bytes_of_packed_layers'] / 1e6:.2f} -> {row['packed_bytes'] / 1e6:.2f}"
                  if "packed_bytes" in row else "-")  # fmt: skip
        error = f"{row['max_abs_vs_reference']:.1e}" if row.get("max_abs_vs_reference") is not None else "-"
        print(f"| {row['model']} | {row['variant']} | {row['median_ms']:.2f} | {row['vs_edgec_dense']:.2f}x "
              f"| {row['vs_onnxruntime']:.2f}x | {row['weight_bytes'] / 1e6:.2f} | {packed} | {error} |")  # fmt: skip


# --------------------------------------------------------------------------
# Part 3: accuracy on scikit-learn's digits
# --------------------------------------------------------------------------


def digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(images, digits.target, test_size=0.3, random_state=seed, stratify=digits.target)


def digits_cnn():
    """A small CNN for 8x8 digits: Conv-BN-ReLU blocks (1x1 and 3x3), a pool, two Linear layers."""
    from torch import nn

    def conv(inputs: int, outputs: int, kernel: int) -> list:
        return [nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

    return nn.Sequential(
        *conv(1, 16, 3), *conv(16, 32, 1), *conv(32, 32, 3), nn.MaxPool2d(2), *conv(32, 64, 1), *conv(64, 32, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


def train(model, images, labels, epochs: int, lr: float, seed: int, masks=None) -> None:
    """Adam on cross-entropy; ``masks`` (param -> 0/1 tensor) are re-applied after every step."""
    import torch

    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if masks:
                with torch.no_grad():
                    for param, mask in masks.items():
                        param.mul_(mask)
    model.eval()


def to_onnx_ir(model, path: Path):
    import onnx_ir as ir
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})  # fmt: skip
    return ir.load(str(path))


def accuracy(graph, images, labels) -> float:
    from edgec.runtimes.reference import onnxruntime_session

    session = onnxruntime_session(graph)  # accuracy only: any thread count
    return float(np.mean(session.run(None, {"x": images})[0].argmax(1) == labels))


def load_weights(model, graph) -> dict:
    """Load the (pruned, rearranged) weights of the exported graph -- each BN folded into its
    Conv -- back into ``model``: Conv weights as they are, each BN reset to the identity with
    the folded bias as its shift. Returns the zero masks of the Conv/Linear weights."""
    import torch

    modules = list(model.modules())
    layers = [m for m in modules if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    nodes = [node for node in graph.graph if node.op_type in ("Conv", "Gemm")]
    masks = {}
    with torch.no_grad():
        for layer, node in zip(layers, nodes, strict=True):
            weight = torch.from_numpy(node.inputs[1].const_value.numpy().copy())
            bias = torch.from_numpy(node.inputs[2].const_value.numpy().copy())
            layer.weight.copy_(weight)
            masks[layer.weight] = (weight != 0).float()
            if isinstance(layer, torch.nn.Linear):
                layer.bias.copy_(bias)
                continue
            norm = modules[modules.index(layer) + 1]
            norm.weight.fill_(1.0)
            norm.bias.copy_(bias)
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0 - norm.eps)
    return masks


def digits_accuracy(sparsities, n: int, workdir: Path, epochs: int = 10, finetune: int = 3, seed: int = 0) -> dict:
    """{"dense": acc, (sparsity, rearrange): {"one-shot": acc, "fine-tuned": acc, "packed": acc}}.

    One-shot: the pass (pack=false) on the trained model. Fine-tuned: those
    weights loaded back into the CNN (``load_weights``) and trained
    ``finetune`` epochs with the zero blocks held at zero (the BNs learn
    again; exported, they fold into weights that keep the zeros); the result, exported again, is packed by
    the pass (sparse from training: not re-pruned, not rearranged), and
    "packed" is the packed model's accuracy under the NumPy references.
    """
    import torch

    from edgec.passes import PackBlockSparsePass
    from edgec.runtimes.reference import run_numpy_reference

    train_x, test_x, train_y, test_y = digits_split(seed)
    torch.manual_seed(seed)  # the initial weights too: plain and rearranged runs start from one model
    model = digits_cnn()
    train(model, train_x, train_y, epochs, 5e-3, seed)
    trained = to_onnx_ir(model, workdir / "digits.onnx")
    results: dict = {"dense": accuracy(trained, test_x, test_y)}
    # as the paper does: the first conv (1 input channel: a block would be 4 whole filters) and
    # the classifier stay dense
    names = [node.name for node in trained.graph if node.op_type in ("Conv", "Gemm")]
    layers = tuple(names[1:-1])
    for sparsity in sparsities:
        for rearrange in (False, True):
            graph = _copy(trained)
            PackBlockSparsePass(n=n, sparsity=sparsity, rearrange=rearrange, layers=layers, pack=False)(graph)
            one_shot = accuracy(graph, test_x, test_y)
            torch.manual_seed(seed)
            twin = digits_cnn()
            masks = load_weights(twin, graph)
            train(twin, train_x, train_y, finetune, 2e-3, seed + 1, masks)
            tuned = to_onnx_ir(twin, workdir / f"digits_{sparsity}_{rearrange}.onnx")
            fine = accuracy(tuned, test_x, test_y)
            PackBlockSparsePass(n=n, sparsity=sparsity, rearrange=rearrange, layers=layers)(tuned)
            packed = float(np.mean(run_numpy_reference(tuned, [test_x])[0].argmax(1) == test_y))
            results[(sparsity, rearrange)] = {"one-shot": one_shot, "fine-tuned": fine, "packed": packed}
    return results


def _copy(graph):
    import onnx_ir as ir

    return ir.serde.deserialize_model(ir.serde.serialize_model(graph))


def accuracy_table(sparsities, n: int, seeds, workdir: Path, epochs: int = 10, finetune: int = 3) -> dict:
    """``digits_accuracy`` for each seed (the seed draws the split, the init and the batches)."""
    return {seed: digits_accuracy(sparsities, n, workdir, epochs, finetune, seed) for seed in seeds}


def print_accuracy(table: dict, n: int) -> None:
    seeds = sorted(table)
    first = table[seeds[0]]
    sparsities = sorted({key[0] for key in first if isinstance(key, tuple)})
    print(f"\n### Digits CNN (sklearn digits, 540 held-out images), N={n}: accuracy vs sparsity\n")
    print("First conv (1 input channel) and classifier dense; fine-tuned = 3 epochs with the mask; "
          "packed = the fine-tuned model packed by the pass, run by the NumPy references.\n")
    print("dense: " + ", ".join(f"seed {seed} {table[seed]['dense']:.3f}" for seed in seeds) + "\n")
    print("| sparsity | seed | one-shot plain | one-shot rearranged | fine-tuned plain | fine-tuned rearranged | packed rearranged |")
    print("|---|---|---|---|---|---|---|")
    for sparsity in sparsities:
        for seed in seeds:
            plain, rearranged = table[seed][(sparsity, False)], table[seed][(sparsity, True)]
            print(f"| {sparsity} | {seed} | {plain['one-shot']:.3f} | {rearranged['one-shot']:.3f} | {plain['fine-tuned']:.3f} "
                  f"| {rearranged['fine-tuned']:.3f} | {rearranged['packed']:.3f} |")  # fmt: skip
        means = [np.mean([table[seed][(sparsity, r)][kind] for seed in seeds])
                 for kind in ("one-shot", "fine-tuned") for r in (False, True)]  # fmt: skip
        print(f"| {sparsity} | mean | {means[0]:.3f} | {means[1]:.3f} | {means[2]:.3f} | {means[3]:.3f} | |")
    print("\nRearranged minus plain, fine-tuned, paired by seed (one split, initial model and batch order "
          "per seed): mean in points, its standard error, and per-seed wins / ties / losses\n")
    for sparsity in sparsities:
        diff = np.array([table[seed][(sparsity, True)]["fine-tuned"] - table[seed][(sparsity, False)]["fine-tuned"] for seed in seeds])
        error = diff.std(ddof=1) / np.sqrt(diff.size) if diff.size > 1 else float("nan")
        print(f"  {sparsity}: {100 * diff.mean():+.2f} +- {100 * error:.2f} points over {diff.size} seeds; "
              f"{np.sum(diff > 0)} / {np.sum(diff == 0)} / {np.sum(diff < 0)}")


# --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["layers", "models"], choices=["layers", "models", "accuracy"])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"], choices=list(models.MODELS))
    parser.add_argument("--kinds", default="pointwise+conv+gemm", help="layer kinds the pass packs (models part)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES), help="layers and models parts")
    parser.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS), help="block sizes N (layers and models parts)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--layer-repeat", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--seeds", type=int, default=20, help="digits runs (seeds 0..SEEDS-1) for the accuracy part")
    parser.add_argument("--threads", type=int, default=None, help="kernel threads for every runtime [default: physical cores]")
    args = parser.parse_args()
    from thread_count import use_threads  # bench/ is sys.path[0] when run as python bench/NAME.py

    args.threads = use_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    results: dict = {"command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory(prefix="edgec-blocksparse-") as tmp:
        workdir = Path(tmp)
        if "layers" in args.parts:
            log("part 1: pointwise layers")
            results["layers"] = bench_layers(args.models, args.rounds, args.layer_repeat, workdir, args.sparsities, args.blocks)
            print_layers(results["layers"], args.sparsities, args.blocks)
        if "models" in args.parts:
            log("part 2: models end to end")
            results["models"] = bench_models(args.models, args.rounds, args.repeat, workdir, tuple(args.kinds.split("+")), args.threads,
                                             args.sparsities, args.blocks)
            print_models(results["models"], args.threads)
        if "accuracy" in args.parts:
            log("part 3: digits accuracy")
            table = accuracy_table((0.3, 0.5, 0.7, 0.8), 4, range(args.seeds), workdir)
            print_accuracy(table, 4)
            results["accuracy"] = {seed: {str(key): value for key, value in rows.items()} for seed, rows in table.items()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
