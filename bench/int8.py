"""int8 against fp32 edgec and against ONNX Runtime int8 on the same QDQ model (issue 17).

Per model (bench/models.py, batch 1, 1x3x224x224, seeded weights):

1. fp32: ``edgec compile model.pt -p fold-bn -t x86``;
2. int8: ``edgec compile model.pt -p fold-bn -p quantize-int8:calibration=calib/`` (``--calib``
   seeded random N(0, 1) inputs, method ``--method``: the models have no trained weights and no
   data set lies on this machine), with ``--qdq-steps`` for its verification;
3. ORT fp32 on the float ONNX and ORT int8 (ORT_ENABLE_ALL: its fused integer kernels) on the
   QDQ model.onnx of build 2, the same graph edgec compiled.

Each runtime runs in its own process (``edgec bench --local --json`` for edgec, ``--worker``
below for ORT), 1 and 2 threads; outputs are checked (int8 against ORT on the QDQ graph as
written, in output quantization steps; fp32 against ORT fp32, edgec's rule) and the ratios are
printed. ``--arm`` adds instructions per inference on emulated boards (int8 / fp32; default
cortex-a53 and cortex-a55, the dot-product preset; ``--arm cortex-a53`` names them), counted as
bench/peers_arm.py does (``edgec device emulate`` + ``edgec bench --rpc``); ``--no-x86`` skips
the x86 builds and timings.

    python bench/int8.py [--models mobilenet_v2,resnet18] [--threads 1,2] [--arm [BOARDS]] [--no-x86]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
EDGEC = [sys.executable, "-m", "edgec.cli"]
SHAPE = "1,3,224,224"
QDQ_STEPS = 1.0  # int8 check: compile's default (1 output step, or ORT fused vs as written when larger)


def run(command: list[str], timeout: float = 3600) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command[:4])}...: {result.stderr.strip().splitlines()[-1:]}")
    return result.stdout


def ort_worker(onnx_path: str, input_path: str, output_path: str, threads: int, repeat: int) -> None:
    """One ORT session (all optimisations), warm-up, ``repeat`` timed runs: median ms as JSON."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.load(input_path)}
    for _ in range(5):
        output = session.run(None, feed)[0]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    np.save(output_path, output)
    print(json.dumps({"median_ms": float(np.median(times))}))


def ort_time(onnx_path: Path, x: Path, out: Path, threads: int, repeat: int) -> float:
    line = run([sys.executable, __file__, "--worker", str(onnx_path), str(x), str(out), str(threads), str(repeat)])
    return json.loads(line.strip().splitlines()[-1])["median_ms"]


def edgec_time(artifact: Path, x: Path, threads: int, repeat: int) -> tuple[float, dict]:
    """Median ms of ``edgec bench --local`` (own process) and its output check against the artifact's reference."""
    result = json.loads(run([*EDGEC, "bench", str(artifact), "--local", "--threads", str(threads), "-i", str(x),
                             "--repeat", str(repeat), "--qdq-steps", str(QDQ_STEPS), "--json"]))  # fmt: skip
    return result["median_ms"], result["check"]


def weight_bytes(onnx_path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(onnx_path))
    sizes: dict[str, int] = {}
    for tensor in model.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        key = {np.dtype(np.float32): "float32", np.dtype(np.int8): "int8"}.get(array.dtype, "other")
        sizes[key] = sizes.get(key, 0) + array.nbytes
    return sizes


def compile_pair(name: str, work: Path, args) -> dict:
    import models

    traced = work / f"{name}.pt"
    models.save_torchscript(name, traced)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.save(work / "x.npy", x)
    calib = work / "calib"
    calib.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for index in range(args.calib):
        np.save(calib / f"{index:03d}.npy", rng.standard_normal((3, 224, 224)).astype(np.float32))
    builds = {}
    for variant, passes in (("fp32", ["-p", "fold-bn"]),
                            ("int8", ["-p", "fold-bn", "-p", f"quantize-int8:calibration={calib},method={args.method}"])):  # fmt: skip
        for target in (*(("x86",) if args.x86 else ()), *(args.arm.split(",") if args.arm else ())):
            out = work / f"{variant}_{target}"
            start = time.perf_counter()
            summary = json.loads(run([*EDGEC, "compile", str(traced), "--input-shape", SHAPE, "-t", target, *passes,
                                      "--qdq-steps", str(args.qdq_steps), "-o", str(out), "--json"]))  # fmt: skip
            builds[(variant, target)] = {"dir": out, "summary": summary, "seconds": time.perf_counter() - start}
            print(f"{name}: built {variant} {target} in {builds[(variant, target)]['seconds']:.0f} s", file=sys.stderr)
    return builds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--models", default="mobilenet_v2,resnet18")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--qdq-steps", type=float, default=QDQ_STEPS)
    parser.add_argument("--arm", nargs="?", const="cortex-a53,cortex-a55", default="")
    parser.add_argument("--no-x86", dest="x86", action="store_false")
    args = parser.parse_args()
    if args.worker:
        onnx_path, x, out, threads, repeat = args.worker
        ort_worker(onnx_path, x, out, int(threads), int(repeat))
        return 0
    from edgec.core.numerics import compare, quantization_step

    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix=f"edgec-int8-{name}-") as directory:
            work = Path(directory)
            builds = compile_pair(name, work, args)
            if not args.x86:
                arm_counts(name, builds, work, args.arm.split(","))
                continue
            fp32, int8 = builds[("fp32", "x86")]["dir"], builds[("int8", "x86")]["dir"]
            x = work / "x.npy"
            verification = json.loads((int8 / "manifest.json").read_text())["verification"]["onnxruntime"]
            step = verification["output_step"]
            print(f"\n## {name}")
            print(f"int8 verification vs ORT (QDQ as written): max abs {verification['max_abs']:.3g} = "
                  f"{verification['max_abs'] / step:.1f} output steps (step {step:.3g}); allowed {verification['atol'] / step:.1f} "
                  f"steps (ORT fused vs as written: {verification['ort_fused_spread'] / step:.1f})")  # fmt: skip
            sizes = {variant: weight_bytes(path / "model.onnx") for variant, path in (("fp32", fp32), ("int8", int8))}
            libs = {variant: (path / "lib.so").stat().st_size for variant, path in (("fp32", fp32), ("int8", int8))}
            print(f"weights: fp32 {sizes['fp32']}, int8 {sizes['int8']}; "
                  f"float32 bytes / int8 bytes {sizes['fp32'].get('float32', 0) / max(sizes['int8'].get('int8', 1), 1):.2f}; "
                  f"lib.so fp32 {libs['fp32']} B, int8 {libs['int8']} B (ratio {libs['int8'] / libs['fp32']:.2f})")  # fmt: skip
            for threads in map(int, args.threads.split(",")):
                times = {}
                times["edgec fp32"], check_fp32 = edgec_time(fp32, x, threads, args.repeat)
                times["edgec int8"], check_int8 = edgec_time(int8, x, threads, args.repeat)
                times["ort fp32"] = ort_time(fp32 / "model.onnx", x, work / "ort_fp32.npy", threads, args.repeat)
                times["ort int8"] = ort_time(int8 / "model.onnx", x, work / "ort_int8.npy", threads, args.repeat)
                ort_int8 = np.load(work / "ort_int8.npy")
                from edgec.runtimes.reference import run_onnxruntime
                import onnx_ir as ir

                as_written = run_onnxruntime(ir.load(str(int8 / "model.onnx")), [np.load(x)], optimize=False)[0]
                fused_steps = np.abs(ort_int8 - as_written).max() / quantization_step([as_written])
                cells = ", ".join(f"{key} {value:.2f} ms" for key, value in times.items())
                print(f"threads {threads}: {cells}")
                print(f"  bench checks: fp32 {json.dumps(check_fp32)[:160]}; int8 {json.dumps(check_int8)[:160]}")
                print(f"  int8/fp32 edgec {times['edgec int8'] / times['edgec fp32']:.2f} (target <= 0.5); "
                      f"edgec int8 / ORT int8 {times['edgec int8'] / times['ort int8']:.2f} (target <= 1.0); "
                      f"ORT int8 / ORT fp32 {times['ort int8'] / times['ort fp32']:.2f}; "
                      f"ORT int8 (fused) vs QDQ as written: {fused_steps:.1f} output steps")  # fmt: skip
            if args.arm:
                arm_counts(name, builds, work, args.arm.split(","))
    return 0


def arm_counts(name: str, builds: dict, work: Path, boards: list[str]) -> None:
    from peers_arm import emulated_boards

    with emulated_boards(tuple(boards)) as addresses:
        for board in boards:
            counts = {}
            for variant in ("fp32", "int8"):
                out = builds[(variant, board)]["dir"]
                bench = json.loads(run([*EDGEC, "bench", str(out), "--rpc", addresses[board], "-i", str(work / "x.npy"),
                                        "--repeat", "1", "--warmup", "0", "--qdq-steps", str(QDQ_STEPS), "--json"]))  # fmt: skip
                counts[variant] = bench["instructions"]["per_inference"]
            verification = json.loads((builds[("int8", board)]["dir"] / "manifest.json").read_text())["verification"]
            checked = verification.get("onnxruntime", {})
            print(f"{name} {board} instructions per inference: fp32 {counts['fp32']:,}, int8 {counts['int8']:,}, "
                  f"int8/fp32 {counts['int8'] / counts['fp32']:.2f} (target <= 0.6); int8 build verification "
                  f"{verification['status']}, max abs vs ORT {checked.get('max_abs')} (step {checked.get('output_step')})",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
