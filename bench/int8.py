"""int8 against fp32 edgec and against ONNX Runtime int8 on the same QDQ model (issue 17).

Per model (bench/models.py, batch 1, 1x3x224x224, seeded weights):

1. fp32: ``edgec compile model.pt -p fold-bn -t x86``;
2. int8: ``edgec compile model.pt -p fold-bn -p quantize-int8:calibration=calib/`` (``--calib``
   seeded random N(0, 1) inputs, method ``--method``: the models have no trained weights and no
   data set lies on this machine), with ``--qdq-steps`` for its verification;
3. ORT fp32 on the float ONNX and ORT int8 (ORT_ENABLE_ALL: its fused integer kernels) on the
   QDQ model.onnx of build 2, the same graph edgec compiled.

Each runtime runs in its own process (bench/peers.py's worker protocol, ``--serve`` below: the
Relax VM on the artifact, or an ONNX Runtime session), 1 and 2 threads, in ``--rounds``
interleaved rounds of ``--repeat`` runs; outputs are checked (int8 against ORT on the QDQ graph
as written, within the build's own allowance, in output quantization steps; fp32 against ORT on
the float graph as written, edgec's rule) and the ratios printed are medians of per-round ratios.
``--arm`` adds instructions per inference on emulated boards (int8 / fp32; default cortex-a53 and
cortex-a55, the dot-product preset; ``--arm cortex-a53`` names them), counted as
bench/peers_arm.py does (``edgec device emulate`` + ``edgec bench --rpc``); ``--no-x86`` skips the
x86 builds and timings.

    python bench/int8.py [--models mobilenet_v2,resnet18] [--threads 1,2] [--rounds 7] [--repeat 10]
                          [--arm [BOARDS]] [--no-x86]
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


def prepare_runtime(runtime: str, path: str, x: np.ndarray, threads: int):
    """(run, output) of one build: ``edgec`` an artifact directory run by the Relax VM, ``ort`` an
    ONNX file in ONNX Runtime with every optimisation (its fused integer kernels on a QDQ graph)."""
    if runtime == "edgec":
        import tvm

        from edgec.core.artifact import load_artifact
        from edgec.runtimes.local import LocalRunner, flatten_outputs

        runner = LocalRunner(load_artifact(path), threads)
        runner.vm.set_input("main", tvm.runtime.tensor(x, runner.device))

        def run():
            runner.vm.invoke_stateful("main")
            return runner.vm.get_outputs("main")

        return run, (lambda: flatten_outputs(run())[0])
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return (lambda: session.run(None, feed)), (lambda: session.run(None, feed)[0])


def time_x86(name: str, builds: dict, work: Path, threads: int, verification: dict, args) -> dict:
    """The four runtimes, each in its own process (bench/peers.py's workers), in interleaved
    rounds; outputs checked: fp32 against ORT on the float graph as written (peers.py's rule,
    edgec's), int8 against ORT on the QDQ graph as written (within ``verification``'s allowance,
    the int8 build's manifest; ORT's fused kernels are shown in output steps). Returns the
    workers and the medians of the per-round ratios."""
    import onnx_ir as ir
    from peers import Worker, time_rounds

    from edgec.runtimes.reference import run_onnxruntime

    fp32, int8 = builds[("fp32", "x86")]["dir"], builds[("int8", "x86")]["dir"]
    x = np.load(work / "x.npy")
    want = {variant: run_onnxruntime(ir.load(str(path / "model.onnx")), [x], optimize=False)[0]
            for variant, path in (("fp32", fp32), ("int8", int8))}  # fmt: skip
    step, allowed = verification["output_step"], verification["atol"]

    def int8_check(limit: float | None):
        def check(got, reference):
            worst = float(np.abs(got - reference).max())
            valid = limit is None or worst <= limit
            return valid, f"{'ok' if valid else 'WRONG'} ({worst / step:.1f} output steps from ORT as written)"

        return check

    variants = (("edgec fp32", "edgec", fp32, "fp32", None), ("edgec int8", "edgec", int8, "int8", int8_check(allowed)),
                ("ort fp32", "ort", fp32 / "model.onnx", "fp32", None),
                ("ort int8", "ort", int8 / "model.onnx", "int8", int8_check(None)))  # fmt: skip
    workers = {}
    try:
        for label, runtime, path, variant, check in variants:  # one at a time: each loads with the machine to itself
            key = label.replace(" ", "_")
            command = [sys.executable, __file__, "--serve", runtime, str(path), str(work), key, str(threads)]
            workers[label] = Worker(key, work, threads, command)
            workers[label].handshake(want[variant], work, check)
        broken = [f"{label}: {w.status}" for label, w in workers.items() if not w.valid]
        if broken:  # a ratio against a failed or wrong runtime means nothing: stop before timing
            raise RuntimeError(f"{name}: " + "; ".join(broken))
        time_rounds(list(workers.values()), args.rounds, args.repeat, f"{name} {threads} thread(s)")
    finally:
        for current in workers.values():
            current.close()

    def ratio(mine: str, other: str) -> float:
        pairs = zip(workers[mine].round_medians, workers[other].round_medians, strict=True)
        return float(np.median([a / b for a, b in pairs]))

    return {"workers": workers, "int8/fp32": ratio("edgec int8", "edgec fp32"), "int8/ort int8": ratio("edgec int8", "ort int8"),
            "ort int8/ort fp32": ratio("ort int8", "ort fp32")}  # fmt: skip


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
    parser.add_argument("--serve", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--models", default="mobilenet_v2,resnet18")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--qdq-steps", type=float, default=QDQ_STEPS)
    parser.add_argument("--arm", nargs="?", const="cortex-a53,cortex-a55", default="")
    parser.add_argument("--no-x86", dest="x86", action="store_false")
    args = parser.parse_args()
    if args.serve:
        from peers import serve

        runtime, path, work, key, threads = args.serve
        x = np.load(Path(work) / "x.npy")
        return serve(lambda: prepare_runtime(runtime, path, x, int(threads)), Path(work) / f"out_{key}.npy")

    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix=f"edgec-int8-{name}-") as directory:
            work = Path(directory)
            builds = compile_pair(name, work, args)
            if not args.x86:
                arm_counts(name, builds, work, args.arm.split(","))
                continue
            fp32, int8 = builds[("fp32", "x86")]["dir"], builds[("int8", "x86")]["dir"]
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
                result = time_x86(name, builds, work, threads, verification, args)
                cells = ", ".join(f"{label} {w.median:.2f} ms" for label, w in result["workers"].items())
                print(f"threads {threads} ({args.rounds} rounds x {args.repeat} runs, interleaved; median ms over all runs): {cells}")
                print("  outputs: " + "; ".join(f"{label} {w.status}" for label, w in result["workers"].items()))
                print(f"  medians of per-round ratios: int8/fp32 edgec {result['int8/fp32']:.2f} (target <= 0.5); "
                      f"edgec int8 / ORT int8 {result['int8/ort int8']:.2f} (target <= 1.0, moonshot 0.8); "
                      f"ORT int8 / ORT fp32 {result['ort int8/ort fp32']:.2f}", flush=True)  # fmt: skip
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
