"""Top-1 agreement of int8 builds with their float builds on torchvision models (issue 17, part 4).

Per model (bench/models.py, seeded weights, BN statistics calibrated): the fp32 and int8 x86
builds of bench/int8.py (``-p fold-bn`` and ``-p fold-bn -p quantize-int8:calibration=...``,
calibrated on ``--calib`` seeded N(0, 1) inputs), then ``--inputs`` other seeded N(0, 1) inputs
(seeds disjoint from the calibration's) through both, in this process:

- top-1 agreement: int8's class = fp32's class;
- top-5: fp32's class among int8's five best;
- the same two for ONNX Runtime on the same QDQ model.onnx (as written) against ONNX Runtime on
  the float graph, so a disagreement that is quantization's, not edgec's, shows in both columns;
- the int8 build against ORT on its QDQ graph, on every input (compile checks 4 seeded ones): the
  inputs outside ``edgec bench``'s tolerance (edgec.core.numerics.int8_tolerance: one output
  quantization step, or 1.5 x what ORT's fused integer kernels differ from the graph as written
  by, on that input or the largest compile measured, whichever is larger), the worst error /
  allowed, and the largest differences of edgec and of ORT fused, in output steps.

``--scale-errors`` adds what the rule can and cannot see: ORT as written on copies of the QDQ graph
with one per-channel weight scale multiplied (the first, a middle and the last int8 layer's, by
1.05, and the middle one's by 1.01), standing for a wrong kernel; per variant (edgec's build
first), the range of output steps from the graph as written and how many inputs the rule refuses,
and the old rule (one input's spread alone, no factor) for comparison.

No data set lies on this machine and the weights are not trained, so the logits are those of a
random network: a harder test for top-1 than a trained one (the classes' margins are small), and
not an accuracy. The trained digits CNN's accuracy is in tests/passes/test_quantize_int8.py.

    python bench/int8_agreement.py [--models mobilenet_v2,resnet18,...] [--inputs 100] [--method minmax] [--scale-errors]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

MODELS = "mobilenet_v2,resnet18,squeezenet1_1,shufflenet_v2_x0_5,mobilenet_v3_small,mnasnet0_5,efficientnet_b0"
RTOL = 1e-4  # edgec bench's default --rtol and --atol
INPUT_SEED = 10_000  # calibration uses default_rng(1); these inputs default_rng(INPUT_SEED + i)


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logits.reshape(-1), kind="stable")[:k]


def agreement(reference: list[np.ndarray], other: list[np.ndarray]) -> tuple[float, float]:
    """(top-1 agreement, fp32 top-1 within other's top-5), in percent."""
    top1 = sum(int(top_k(a, 1)[0] == top_k(b, 1)[0]) for a, b in zip(reference, other, strict=True))
    top5 = sum(int(top_k(a, 1)[0] in top_k(b, 5)) for a, b in zip(reference, other, strict=True))
    return 100.0 * top1 / len(reference), 100.0 * top5 / len(reference)


SCALE_ERRORS = (("first", 1.05), ("middle", 1.05), ("middle", 1.01), ("last", 1.05))


def scaled(graph, which: str, factor: float):
    """A copy of the QDQ ``graph`` with the ``which`` (first, middle, last) per-channel weight scale times ``factor``."""
    import onnx_ir as ir
    from onnx import numpy_helper

    proto = ir.serde.serialize_model(graph)
    tensors = {tensor.name: tensor for tensor in proto.graph.initializer}
    names = dict.fromkeys(node.input[1] for node in proto.graph.node if node.op_type == "DequantizeLinear")
    per_channel = [name for name in names if name in tensors and numpy_helper.to_array(tensors[name]).size > 1]
    name = {"first": per_channel[0], "middle": per_channel[len(per_channel) // 2], "last": per_channel[-1]}[which]
    tensors[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensors[name]) * np.float32(factor), name))
    return ir.serde.deserialize_model(proto)


def refused(got: np.ndarray, want: np.ndarray, allowed: float) -> bool:
    """edgec bench's check (edgec.core.numerics.compare with rtol = atol = RTOL) with the int8 allowance."""
    return float(np.abs(got - want).max()) > max(RTOL, allowed) + RTOL * float(np.abs(want).max())


def measure(name: str, args) -> dict:
    import onnx_ir as ir

    from edgec.core.artifact import load_artifact
    from edgec.core.numerics import int8_tolerance
    from edgec.runtimes.local import LocalRunner
    from edgec.runtimes.reference import qdq_references, run_onnxruntime
    from int8 import compile_pair

    with tempfile.TemporaryDirectory(prefix=f"edgec-int8-agree-{name}-") as directory:
        work = Path(directory)
        args.x86, args.arm = True, ""
        builds = compile_pair(name, work, args)
        fp32_dir, int8_dir = builds[("fp32", "x86")]["dir"], builds[("int8", "x86")]["dir"]
        fp32, int8 = LocalRunner(load_artifact(fp32_dir), threads=1), LocalRunner(load_artifact(int8_dir), threads=1)
        noise = int8.artifact.manifest["verification"]["onnxruntime"]["int8_noise_steps"]  # what edgec bench uses
        float_graph, qdq_graph = ir.load(str(fp32_dir / "model.onnx")), ir.load(str(int8_dir / "model.onnx"))
        outputs: dict[str, list[np.ndarray]] = {"edgec fp32": [], "edgec int8": [], "ort fp32": [], "ort int8": []}
        worst = {"edgec": 0.0, "ort fused": 0.0, "edgec vs fused": 0.0}
        outside, worst_ratio = 0, 0.0
        wrong = {f"{which} x{factor:g}": scaled(qdq_graph, which, factor) for which, factor in SCALE_ERRORS} if args.scale_errors else {}
        sensitivity = {variant: {"steps": [], "new": 0, "old": 0} for variant in ["edgec", *wrong]}
        for index in range(args.inputs):
            x = np.random.default_rng(INPUT_SEED + index).standard_normal((1, 3, 224, 224)).astype(np.float32)
            outputs["edgec fp32"].append(fp32.run([x])[0])
            outputs["edgec int8"].append(int8.run([x])[0])
            outputs["ort fp32"].append(run_onnxruntime(float_graph, [x])[0])
            (as_written,), fused = qdq_references(qdq_graph, [x])
            outputs["ort int8"].append(as_written)
            allowed, step, spread = int8_tolerance([as_written], fused, args.qdq_steps, noise)
            error = float(np.abs(outputs["edgec int8"][-1] - as_written).max())
            atol = max(RTOL, allowed) + RTOL * float(np.abs(as_written).max())  # edgec bench's rule (numerics.compare)
            outside += error > atol
            worst_ratio = max(worst_ratio, error / atol)
            to_fused = float(np.abs(outputs["edgec int8"][-1] - fused[0]).max()) if fused is not None else float("nan")
            worst = {"edgec": max(worst["edgec"], error / step), "ort fused": max(worst["ort fused"], spread / step),
                     "edgec vs fused": max(worst["edgec vs fused"], to_fused / step)}
            if wrong:
                candidates = {"edgec": outputs["edgec int8"][-1]}
                candidates.update((variant, run_onnxruntime(graph, [x], optimize=False)[0]) for variant, graph in wrong.items())
                old_allowed = max(args.qdq_steps * step, spread)
                for variant, got in candidates.items():
                    record = sensitivity[variant]
                    record["steps"].append(float(np.abs(got - as_written).max()) / step)
                    record["new"] += refused(got, as_written, allowed)
                    record["old"] += refused(got, as_written, old_allowed)
            print(f"{name}: input {index + 1}/{args.inputs}", end="\r", file=sys.stderr)
        print(file=sys.stderr)
    return {
        "edgec": agreement(outputs["edgec fp32"], outputs["edgec int8"]),
        "ort": agreement(outputs["ort fp32"], outputs["ort int8"]),
        "fp32": agreement(outputs["ort fp32"], outputs["edgec fp32"]),
        "edgec vs ort int8": agreement(outputs["ort int8"], outputs["edgec int8"]),
        "outside": outside,
        "worst / allowed": worst_ratio,
        "steps": worst,
        "noise": noise,
        "sensitivity": sensitivity,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--inputs", type=int, default=100, help="seeded inputs per model (not the calibration's)")
    parser.add_argument("--calib", type=int, default=16, help="seeded calibration inputs (as bench/int8.py)")
    parser.add_argument("--method", default="minmax", help="calibration method: minmax, percentile, entropy")
    parser.add_argument("--qdq-steps", type=float, default=1.0, help="compile's int8 verification tolerance")
    parser.add_argument("--scale-errors", action="store_true", help="also graphs with one weight scale off (what the rule refuses)")
    args = parser.parse_args()
    if args.inputs < 1:
        parser.error("--inputs must be at least 1")
    rows = []
    for name in args.models.split(","):
        result = measure(name, args)
        rows.append((name, result))
        print(f"{name}: { {key: value for key, value in result.items() if key != 'sensitivity'} }", file=sys.stderr)
    print(f"\n{args.inputs} seeded N(0,1) inputs per model, calibration {args.calib} inputs, method {args.method}, x86\n")
    print("| model | int8 vs fp32 top-1 (edgec) | fp32 top-1 in int8 top-5 (edgec) | same for ORT (QDQ as written vs float) "
          "| edgec int8 vs ORT int8 top-1 | edgec fp32 vs ORT fp32 top-1 | inputs outside the int8 tolerance "
          "| worst output steps: edgec / ORT fused (vs QDQ as written) | edgec vs ORT fused |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['edgec'][0]:.0f}% | {r['edgec'][1]:.0f}% | {r['ort'][0]:.0f}% / {r['ort'][1]:.0f}% "
              f"| {r['edgec vs ort int8'][0]:.0f}% | {r['fp32'][0]:.0f}% | {r['outside']} of {args.inputs} ({r['worst / allowed']:.2f}) "
              f"| {r['steps']['edgec']:.1f} / {r['steps']['ort fused']:.1f} | {r['steps']['edgec vs fused']:.1f} |")  # fmt: skip
    if args.scale_errors:
        print("\n| model | noise (steps, compile's 4 seeds) | variant | output steps from ORT as written | refused now | refused by the old rule |")
        print("|---|---:|---|---|---:|---:|")
        for name, r in rows:
            for variant, record in r["sensitivity"].items():
                print(f"| {name} | {r['noise']:.1f} | {variant} | {min(record['steps']):.2f}-{max(record['steps']):.2f} "
                      f"| {record['new']} of {args.inputs} | {record['old']} of {args.inputs} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
