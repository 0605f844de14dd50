"""edgec on an NVIDIA GPU against ONNX Runtime's CUDA EP and PyTorch CUDA: same GPU, same run.

For each model (bench/models.py: MobileNetV2, ResNet-18; batch 1, 1x3x224x224, seeded weights):

1. compile it with ``edgec.compile(model, "cuda:arch=<this GPU's>,dtype=<each --dtypes>")``:
   the build is verified on the GPU against ONNX Runtime and PyTorch on the CPU before it is
   kept (float16 with its looser tolerance);
2. time edgec (TVM's time evaluator on the GPU), ONNX Runtime with CUDAExecutionProvider
   (input and output bound on the GPU, TF32 off) and PyTorch CUDA (eager, cuDNN autotuner on,
   TF32 off), each in its own process, interleaved round after round; first, every runner's
   output on the seeded input is checked against ONNX Runtime on the CPU;
3. profile edgec's kernels on the GPU (the five heaviest per build);
4. print one table: median ms over all runs and the ratios to ORT-CUDA and torch-CUDA (the
   median over rounds of the ratio of the two round medians).

A runner that cannot run here (an onnxruntime without the CUDA EP, a CPU build of torch)
gets a row saying why; the others still run. PyTorch runs in ``--torch-python`` (default:
the first of this Python and ``python3`` whose torch sees a GPU), which needs only torch
and NumPy: weights travel as .npz.

    python bench/gpu_check.py [--models mobilenet_v2,resnet18] [--dtypes float32,float16]
                              [--rounds 10] [--repeat 20] [--torch-python PY]
                              [-o table.md] [--json raw.json]
    python bench/gpu_check.py --dry-run     # no GPU here: compile for CUDA (nvcc checks the
        # kernels), then the same bench with this CPU standing in for the GPU (an x86 build,
        # ORT's CPU EP, torch on the CPU): checks the script, says nothing about GPUs

Exit status: 0 when every runner that ran matched the reference, 1 when one did not or a
build failed, 2 when there is no GPU (without --dry-run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PROTOCOL = "GPUCHECK "  # children answer on stdout with this prefix; anything else they print is passed through
PEER_TOLERANCE = 1e-3  # peers' outputs vs ORT on the CPU (GPU reductions run in another order)
SETUP_TIMEOUT_S = 600.0  # a child's import, load and first run (NVRTC/cuDNN autotune included)
TIME_TIMEOUT_S = 300.0
PAUSE_S = 0.1


# --- children: one runner each, driven over stdin/stdout ----------------------------------


def _say(**message) -> None:
    print(PROTOCOL + json.dumps(message), flush=True)


def _wall_ms(function, count: int, sync=lambda: None) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        function()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _edgec_child(args):
    from edgec.core.artifact import load_artifact
    from edgec.runtimes.local import LocalRunner

    artifact = load_artifact(args.artifact)
    runner = LocalRunner(artifact)  # CUDA artifacts: GPU 0; x86 (dry run): this CPU
    x = np.load(args.input)
    output = runner.run([x])[0]
    device = "GPU 0 (TVM time evaluator)" if artifact.manifest["target"]["arch"] == "cuda" else "CPU (dry run: the x86 float32 build)"

    def time_ms(count: int) -> list[float]:
        return runner.time_ms([x], repeat=count, warmup=1)

    def profile_rows() -> dict:
        from edgec.runtimes.profile import profile
        from edgec.runtimes.session import LocalDevice

        with LocalDevice() as local:
            result = profile(artifact, local, repeat=5)
        rows = [{"kernel": row.kernel, "ms": row.total_ms, "calls": row.calls, "gflops": row.gflops} for row in result.rows[:5]]
        return {"end_to_end_ms": result.end_to_end_ms, "kernels_ms": result.kernels_ms, "top": rows}

    return output, device, time_ms, profile_rows


def _ort_child(args):
    import onnxruntime as ort

    x = np.load(args.input)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if args.device == "gpu":
        if hasattr(ort, "preload_dlls"):  # CUDA, cuBLAS, cuDNN from NVIDIA's pip wheels (onnxruntime-gpu[cuda,cudnn])
            ort.preload_dlls()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")
        providers = [("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"})]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(args.onnx, options, providers=providers)
    if args.device == "gpu" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"onnxruntime fell back to {session.get_providers()} (the CUDA EP did not load: CUDA/cuDNN versions?)")
    name = session.get_inputs()[0].name
    output = session.run(None, {name: x})[0]
    if args.device != "gpu":
        return output, f"CPU (dry run), onnxruntime {ort.__version__}", lambda n: _wall_ms(lambda: session.run(None, {name: x}), n), None
    binding = session.io_binding()
    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    binding.bind_output(session.get_outputs()[0].name, "cuda", 0)
    session.run_with_iobinding(binding)
    output = binding.copy_outputs_to_cpu()[0]
    return output, f"GPU 0, onnxruntime-gpu {ort.__version__}", lambda n: _wall_ms(lambda: session.run_with_iobinding(binding), n), None


def _torch_child(args):
    import torch

    sys.path.insert(0, str(BENCH))
    import models

    if args.device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} in {sys.executable} sees no GPU (a CPU build?); give --torch-python")
    module = models.MODELS[args.model](seed=0)
    with np.load(args.weights) as weights:
        module.load_state_dict({key: torch.from_numpy(weights[key]) for key in weights.files})
    module.eval()
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    module = module.to(device)
    x = torch.from_numpy(np.load(args.input)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        output = module(x).float().cpu().numpy()
        for _ in range(3):  # the autotuner's choice is made on the first runs
            module(x)
        sync()

    def time_ms(count: int) -> list[float]:
        with torch.inference_mode():
            return _wall_ms(lambda: module(x), count, sync)

    label = f"GPU 0 {torch.cuda.get_device_name(0)}, torch {torch.__version__}" if device.type == "cuda" else f"CPU (dry run), torch {torch.__version__}"
    return output, label, time_ms, None


CHILDREN = {"edgec": _edgec_child, "ort": _ort_child, "torch": _torch_child}


def child_main(args) -> int:
    try:
        output, device, time_ms, profile_rows = CHILDREN[args.child](args)
    except Exception as error:  # noqa: BLE001 - reported to the parent as this runner's reason
        lines = str(error).strip().splitlines()
        _say(ready=False, reason=f"{type(error).__name__}: {lines[-1] if lines else ''}"[:500])
        return 0
    np.save(args.output, np.asarray(output, dtype=np.float32))
    _say(ready=True, device=device)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] == "time":
            _say(ms=time_ms(int(command[1])))
        elif command[0] == "profile":
            _say(profile=profile_rows() if profile_rows else None)
    return 0


# --- the parent --------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
    name: str
    command: list[str]
    output: Path
    process: subprocess.Popen | None = None
    answers: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    ready: bool = False
    reason: str = ""
    device: str = ""
    check: str = ""
    ok: bool = True
    samples: list[float] = dataclasses.field(default_factory=list)
    round_medians: list[float] = dataclasses.field(default_factory=list)
    compile_s: float | None = None
    profile: dict | None = None
    tolerance: float = PEER_TOLERANCE  # of the output check against ORT on the CPU

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                self.answers.put(json.loads(line[len(PROTOCOL):]))
            else:
                sys.stderr.write(f"  [{self.name}] {line}")
        self.answers.put(None)

    def answer(self, timeout: float) -> dict:
        try:
            message = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.name}: no answer within {timeout:g} s") from None
        if message is None:
            raise RuntimeError(f"{self.name}: the process exited (status {self.process.wait()})")
        return message

    def ask(self, command: str, timeout: float) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.answer(timeout)

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.process.kill()
            self.process.wait()

    @property
    def median(self) -> float:
        return float(np.median(self.samples)) if self.samples else float("nan")


def child_command(python: str, kind: str, device: str, model: str, work: Path, name: str, **paths) -> tuple[list[str], Path]:
    output = work / f"{name}.npy"
    command = [python, str(Path(__file__).resolve()), "--child", kind, "--device", device, "--model", model,
               "--input", str(work / "x.npy"), "--output-file", str(output)]
    for key, value in paths.items():
        command += [f"--{key}", str(value)]
    return command, output


def python_with_gpu_torch(candidates: list[str]) -> tuple[str | None, str]:
    """The first interpreter whose torch sees a GPU, and what each candidate said."""
    notes = []
    for python in candidates:
        if not python or shutil.which(python) is None:
            continue
        probe = "import torch; print(torch.__version__, torch.cuda.is_available())"
        try:
            done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=180, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            notes.append(f"{python}: {error}")
            continue
        words = done.stdout.split()
        if done.returncode == 0 and words[-1:] == ["True"]:
            return python, f"{python}: torch {words[0]}"
        notes.append(f"{python}: " + (f"torch {words[0]}, no GPU" if done.returncode == 0 else "no torch"))
    return None, "; ".join(notes) or "no candidate"


def check_output(runner: Runner, want: np.ndarray, tolerance: float) -> None:
    got = np.load(runner.output)
    if got.shape != want.shape:
        runner.ok, runner.check = False, f"MISMATCH: shape {got.shape} vs {want.shape}"
        return
    from edgec.core.numerics import compare

    agreement = compare([got], [want], rtol=tolerance, atol=tolerance)  # edgec's one rule (edgec/core/numerics.py)
    runner.ok = agreement.ok
    runner.check = f"{'ok' if runner.ok else 'MISMATCH'} (max abs err {agreement.max_abs:.1e}, tol {tolerance:g})"


def measure(runners: list[Runner], rounds: int, repeat: int) -> None:
    for _ in range(rounds):
        for runner in runners:
            time.sleep(PAUSE_S)
            block = runner.ask(f"time {repeat}", TIME_TIMEOUT_S)["ms"]
            runner.samples += block
            runner.round_medians.append(float(np.median(block)))


def paired_ratio(runner: Runner, reference: Runner | None) -> str:
    if reference is None or not reference.round_medians or not runner.round_medians:
        return ""
    ratios = [a / b for a, b in zip(runner.round_medians, reference.round_medians, strict=True)]
    return f"{float(np.median(ratios)):.2f}x"


def bench_model(name: str, args, work: Path, device: str, arch: str, torch_python: str | None, torch_note: str) -> dict:
    import onnx_ir as ir
    import torch

    import edgec
    import models
    from edgec.runtimes.reference import ORT_MAX_IR_VERSION, run_onnxruntime

    work = work / name
    work.mkdir()
    module = models.MODELS[name](seed=0)
    np.savez(work / "weights.npz", **{key: value.detach().numpy() for key, value in module.state_dict().items()})
    source = work / f"{name}.pt"  # from this very module: a second build of it may differ (bench/models.py seeds
    torch.jit.save(torch.jit.script(module), str(source))  # the convolutions and BN, not every layer)
    x = np.random.default_rng(0).standard_normal(models.INPUT_SHAPE, dtype=np.float32)
    np.save(work / "x.npy", x)
    model = edgec.load(source, input_shape=models.INPUT_SHAPE)
    (want,) = run_onnxruntime(model.graph, [x])
    proto = ir.serde.serialize_model(model.graph)  # the graph edgec compiles, for ONNX Runtime
    proto.ir_version = min(proto.ir_version, ORT_MAX_IR_VERSION)
    (work / "model.onnx").write_bytes(proto.SerializeToString())
    stand_in = None  # dry run: an x86 build of the same graph stands in for the CUDA builds

    runners: list[Runner] = []
    builds = {}
    for dtype in args.dtypes:
        spec = f"cuda:arch={arch},dtype={dtype}"
        start = time.perf_counter()
        print(f"{name}: edgec compile -t {spec}", file=sys.stderr, flush=True)
        try:
            result = edgec.compile(model, spec, work / f"edgec_{dtype}")
        except edgec.EdgecError as error:
            failed = Runner(f"edgec {dtype}", [], work / "none.npy", reason=f"compile failed: {error}", ok=False)
            runners.append(failed)
            continue
        builds[dtype] = {"seconds": round(time.perf_counter() - start, 1), "verification": result.manifest["verification"],
                         "files": result.manifest["files"]}
        artifact = result.artifact.path
        if device == "cpu":
            stand_in = stand_in or edgec.compile(model, "x86", work / "edgec_x86").artifact.path
            artifact = stand_in
        command, output = child_command(sys.executable, "edgec", device, name, work, f"edgec_{dtype}", artifact=artifact)
        tolerance = result.manifest["target"]["min_tolerance"] or 1e-4
        runners.append(Runner(f"edgec {dtype}", command, output, compile_s=builds[dtype]["seconds"], tolerance=tolerance))
    command, output = child_command(sys.executable, "ort", device, name, work, "ort", onnx=work / "model.onnx")
    runners.append(Runner("ONNX Runtime CUDA EP" if device == "gpu" else "ONNX Runtime (CPU)", command, output))
    if torch_python is not None:
        command, output = child_command(torch_python, "torch", device, name, work, "torch", weights=work / "weights.npz")
        torch_runner = Runner("PyTorch CUDA" if device == "gpu" else "PyTorch (CPU)", command, output)
    else:
        torch_runner = Runner("PyTorch CUDA", [], work / "none.npy", reason=f"no torch with CUDA: {torch_note}")
    runners.append(torch_runner)

    live = [runner for runner in runners if runner.command]
    for runner in live:
        runner.start()
    for runner in live:
        try:
            hello = runner.answer(SETUP_TIMEOUT_S)
        except RuntimeError as error:
            hello = {"ready": False, "reason": str(error)}
        runner.ready, runner.reason, runner.device = hello["ready"], hello.get("reason", ""), hello.get("device", "")
        if runner.ready:
            check_output(runner, want, runner.tolerance)
    timed = [runner for runner in live if runner.ready and runner.ok]
    print(f"{name}: timing {', '.join(r.name for r in timed)}; {args.rounds} rounds x {args.repeat} runs", file=sys.stderr, flush=True)
    try:
        for runner in timed:  # warm-up, untimed
            runner.ask("time 3", TIME_TIMEOUT_S)
        measure(timed, args.rounds, args.repeat)
        for runner in timed:
            if runner.name.startswith("edgec"):
                runner.profile = runner.ask("profile", TIME_TIMEOUT_S)["profile"]
    finally:
        for runner in live:
            runner.stop()
    return {"model": name, "runners": runners, "builds": builds}


def table(results: list[dict], header: str) -> str:
    lines = [header, "", "| model | runner | device | median ms | vs ORT-CUDA | vs torch-CUDA | numerics vs ORT (CPU) | compile s |",
             "|---|---|---|---:|---:|---:|---|---:|"]
    for result in results:
        by_name = {runner.name: runner for runner in result["runners"]}
        ort = next((r for r in result["runners"] if r.name.startswith("ONNX") and r.samples), None)
        torch_runner = next((r for r in result["runners"] if r.name.startswith("PyTorch") and r.samples), None)
        for runner in by_name.values():
            if not runner.samples:
                why = runner.reason or runner.check or "not timed"
                lines.append(f"| {result['model']} | {runner.name} | - | - | - | - | {why} | |")
                continue
            compile_s = f"{runner.compile_s:.1f}" if runner.compile_s is not None else ""
            lines.append(
                f"| {result['model']} | {runner.name} | {runner.device} | {runner.median:.3f} | {paired_ratio(runner, ort)} | "
                f"{paired_ratio(runner, torch_runner)} | {runner.check} | {compile_s} |"
            )
    for result in results:
        for runner in result["runners"]:
            if runner.profile:
                profile = runner.profile
                lines += ["", f"{result['model']} {runner.name}: kernels sum {profile['kernels_ms']:.3f} ms of "
                          f"{profile['end_to_end_ms']:.3f} ms end to end; heaviest:"]
                lines += [f"  {row['ms']:8.3f} ms  {row['calls']:2d} x  {row['gflops']:8.1f} GFLOP/s  {row['kernel']}" for row in profile["top"]]
    return "\n".join(lines)


def preflight(args) -> tuple[object | None, str]:
    """GPU 0 (edgec's view), and one line per piece this run depends on."""
    import onnxruntime as ort
    import tvm

    import edgec
    from edgec.core.errors import NoCudaDeviceError
    from edgec.runtimes import cuda

    lines = [f"edgec {edgec.__version__}, TVM {tvm.__version__}, Python {sys.version.split()[0]} ({sys.executable})"]
    smi = shutil.which("nvidia-smi")
    if smi:
        done = subprocess.run([smi, "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60, check=False)
        lines.append(f"nvidia-smi: {done.stdout.strip() or done.stderr.strip()}")
    else:
        lines.append("nvidia-smi: not installed")
    try:
        gpu = cuda.gpu()
        lines.append(f"edgec GPU 0: {json.dumps(gpu.as_dict())}")
    except NoCudaDeviceError as error:
        gpu = None
        lines.append(f"edgec: {error}")
    lines.append(f"nvcc: {shutil.which('nvcc') or 'not installed (kernels are compiled at load time instead)'}")
    lines.append(f"onnxruntime {ort.__version__}: providers {ort.get_available_providers()}")
    return gpu, "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenet_v2,resnet18")
    parser.add_argument("--dtypes", default="float32,float16", help="edgec builds: cuda:dtype=... for each")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--torch-python", help="a Python whose torch is a CUDA build [default: search]")
    parser.add_argument("--arch", default="sm_80", help="--dry-run only: the arch to compile for [sm_80]")
    parser.add_argument("--dry-run", action="store_true", help="compile for CUDA, bench with the CPU standing in for the GPU")
    parser.add_argument("-o", "--output", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--json", type=Path, help="also write the raw samples here")
    # a child process (one runner): internal
    for flag in ("--child", "--device", "--model", "--input", "--output-file", "--artifact", "--onnx", "--weights"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.output = args.output_file
        return child_main(args)

    sys.path.insert(0, str(BENCH))
    args.dtypes = [dtype.strip() for dtype in args.dtypes.split(",") if dtype.strip()]
    gpu, environment = preflight(args)
    print(environment, file=sys.stderr, flush=True)
    if gpu is None and not args.dry_run:
        print("no GPU that edgec can use here (see above): nothing was compiled or timed; "
              "`--dry-run` checks this script without one", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "gpu"
    arch = gpu.arch if gpu is not None else args.arch
    candidates = [args.torch_python] if args.torch_python else [sys.executable, "python3"]
    if device == "gpu":
        torch_python, torch_note = python_with_gpu_torch(candidates)
    else:
        torch_python, torch_note = sys.executable, "this Python's torch, on the CPU (dry run)"
    print(f"PyTorch runner: {torch_note}", file=sys.stderr, flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgec-gpu-check-") as work:
        for name in (item.strip() for item in args.models.split(",") if item.strip()):
            results.append(bench_model(name, args, Path(work), device, arch, torch_python, torch_note))
    what = f"GPU 0 {gpu.name} ({gpu.arch})" if device == "gpu" else "DRY RUN: the CPU stands in for the GPU; timings say nothing about GPUs"
    header = (f"{what}; batch 1, 1x3x224x224; {args.rounds} rounds x {args.repeat} runs, interleaved, each runner in its own "
              "process; median ms over all runs; ratios: median over rounds of the ratio of round medians; edgec timed by "
              "TVM's time evaluator on the device, ORT (I/O bound on the device) and PyTorch by the wall clock around a "
              "synchronised run")
    text = table(results, header)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    if args.json:
        raw = {result["model"]: {"builds": result["builds"], "runners": {
            runner.name: {"samples": runner.samples, "device": runner.device, "check": runner.check, "reason": runner.reason,
                          "profile": runner.profile} for runner in result["runners"]}} for result in results}
        args.json.write_text(json.dumps(raw, indent=1))
    bad = [runner for result in results for runner in result["runners"]
           if not runner.ok or (runner.name.startswith("edgec") and not runner.samples)]
    for runner in bad:
        print(f"FAILED: {runner.name}: {runner.reason or runner.check}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
