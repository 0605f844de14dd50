"""edgec against the runtimes a user could pick instead, each in its own process.

Runtimes (``--runtimes``; the peers install with ``pip install -c constraints.txt -e '.[peers]'``):

    edgec        edgec.compile(..., "x86") with its defaults, run by the Relax VM
    ort          ONNX Runtime, CPU EP, ORT_ENABLE_ALL, on the same ONNX edgec compiles
    openvino     OpenVINO CPU, INFERENCE_PRECISION_HINT=f32, PERFORMANCE_HINT=LATENCY
    executorch   ExecuTorch + XNNPACK (to_edge_transform_and_lower of a torch.export program)
    ncnn         ncnn, converted from TorchScript by pnnx
    torch        PyTorch eager, inference mode

Every runtime runs in a worker process of its own (``--worker``): it loads or
converts the model, runs it once on the shared seeded input, and sends back its
output, which the driver checks against PyTorch's (``|got - want| <= 1e-4 *
max|want| + 1e-5``; a peer with wrong outputs is shown as WRONG and not counted
as a peer). Then the driver interleaves rounds: in each round every worker runs
``--repeat`` timed inferences (wall clock around one inference call, the same
for all runtimes), with a pause between workers so the previous runtime's
spinning threads go idle. Per runtime: the median over all runs; edgec's ratio
to the best valid peer is the median over rounds of (edgec's round median / the
best peer's round median in that round).

At two threads or more, bench/core_pair.py's probe runs after every pause: a
round in which it found the two threads unable to run at full speed together
(on this VM: both virtual CPUs on one physical core, for spells of about a
second) is disturbed, and a second ratio counts only the undisturbed rounds
(``--no-core-probe``: no probe).

    python bench/peers.py [--models mobilenet_v2,resnet18,...] [--threads N]
                          [--rounds 11] [--repeat 10] [--runtimes edgec,ort,...] [-o table.md] [--json raw.json] [--no-core-probe]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

from timing import publish  # noqa: E402 - bench/ on sys.path first

RUNTIMES = ("edgec", "ort", "openvino", "executorch", "ncnn", "torch")
DEFAULT_MODELS = "mobilenet_v2,resnet18,squeezenet1_1,shufflenet_v2_x0_5,mobilenet_v3_small,mnasnet0_5,efficientnet_b0"
PAUSE_S = 0.25
REL_TOLERANCE, ABS_TOLERANCE = 1e-4, 1e-5


# --- the worker: one runtime, one model ---------------------------------------------------------


def _prepare(runtime: str, work: Path, threads: int):
    """Load ``runtime`` on the model in ``work``; return a callable running one inference -> output."""
    x = np.load(work / "input.npy")
    if runtime == "edgec":
        import tvm
        from tvm import relax

        import edgec

        model = edgec.load(work / "model.pt", input_shape=x.shape)
        artifact = edgec.compile(model, "x86", work / "edgec", verify=False).artifact
        device = tvm.cpu()
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact.lib)), device)
        vm.set_input("main", tvm.runtime.tensor(x, device))

        def run():
            vm.invoke_stateful("main")
            return vm.get_outputs("main")

        def output():
            return _first_array(run())

        return run, output
    if runtime == "ort":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(work / "model.onnx"), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x}
        return (lambda: session.run(None, feed)), (lambda: session.run(None, feed)[0])
    if runtime == "openvino":
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
        }
        compiled = core.compile_model(str(work / "model.onnx"), "CPU", config)
        request = compiled.create_infer_request()
        tensor = ov.Tensor(x)

        def run():
            request.infer({0: tensor})

        def output():
            run()
            return np.array(request.get_output_tensor(0).data)

        return run, output
    if runtime == "executorch":
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.extension.pybindings import portable_lib

        module = _module(work)
        exported = torch.export.export(module, (torch.from_numpy(x),))
        program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
        path = work / "model.pte"
        path.write_bytes(program.buffer)
        portable_lib._unsafe_reset_threadpool(threads)
        loaded = portable_lib._load_for_executorch(str(path))
        tensor = torch.from_numpy(x)
        return (lambda: loaded.forward([tensor])), (lambda: loaded.forward([tensor])[0].numpy())
    if runtime == "ncnn":
        import importlib.util

        import ncnn

        # pnnx's executable, found without importing the pnnx package: that imports torch, and
        # ncnn segfaults in a process that has loaded torch (two OpenMP runtimes)
        pnnx_dir = importlib.util.find_spec("pnnx").submodule_search_locations[0]
        shape = ",".join(str(d) for d in x.shape)
        command = [str(Path(pnnx_dir) / "pnnx"), "model.pt", f"inputshape=[{shape}]f32", "fp16=0"]  # writes model.ncnn.* beside it
        done = subprocess.run(command, cwd=work, capture_output=True, text=True, check=False)
        param, weights = work / "model.ncnn.param", work / "model.ncnn.bin"
        if done.returncode != 0 or not param.is_file():
            raise RuntimeError(f"pnnx failed ({done.returncode}): {done.stderr[-300:]}")
        net = ncnn.Net()
        net.opt.num_threads = threads
        net.opt.use_fp16_packed = net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
        net.opt.use_bf16_storage = False
        if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
            raise RuntimeError("ncnn could not load pnnx's model files")
        planes = np.ascontiguousarray(x[0])
        image = ncnn.Mat(planes)

        def run(copy: bool = False, _alive=(planes, image)):  # image wraps planes' memory
            with net.create_extractor() as extractor:  # its blobs (and the output Mat) die with it
                extractor.input("in0", image)
                _, out = extractor.extract("out0")
                return np.array(out).reshape(1, -1) if copy else None

        return run, (lambda: run(copy=True))
    if runtime == "torch":
        import torch

        torch.set_num_threads(threads)
        module = _module(work)
        tensor = torch.from_numpy(x)

        def run():
            with torch.inference_mode():
                return module(tensor)

        return run, (lambda: run().numpy())
    raise ValueError(f"unknown runtime {runtime!r}")


def _module(work: Path):
    """The model as a PyTorch module, rebuilt from its name and seed (bench/models.py)."""
    import models

    return models.build((work / "model.name").read_text(), seed=0)


def _first_array(result) -> np.ndarray:
    while not hasattr(result, "numpy"):
        result = result[0]
    return result.numpy()


def worker(runtime: str, work: Path, threads: int) -> int:
    """One runtime on the model in ``work``, served by ``serve``."""
    from edgec.runtimes.local import configure_threads

    configure_threads(threads)
    return serve(lambda: _prepare(runtime, work, threads), work / f"out_{runtime}.npy")


def serve(prepare, output_path: Path) -> int:
    """Line protocol on stdin/stdout: ``prepare()`` -> (run, output); after it, one JSON line
    {"ok", "load_s"} (the output saved to ``output_path``); then each line ``N`` -> a JSON list
    of N latencies in ms; an empty line ends. bench/int8.py's workers speak it too."""
    out = sys.stdout
    sys.stdout = sys.stderr  # converters print; only protocol lines go to the real stdout
    start = time.perf_counter()
    try:
        run, output = prepare()
        got = np.asarray(output(), dtype=np.float32)
        np.save(output_path, got)
        reply = {"ok": True, "load_s": time.perf_counter() - start}
    except Exception as error:  # noqa: BLE001 - reported to the driver as this runtime's failure
        reply = {"ok": False, "error": f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"}
    out.write(json.dumps(reply) + "\n")
    out.flush()
    if not reply["ok"]:
        return 1
    for line in sys.stdin:
        if not line.strip():
            break
        count = int(line)
        times = []
        for _ in range(count):
            begin = time.perf_counter()
            run()
            times.append((time.perf_counter() - begin) * 1e3)
        out.write(json.dumps(times) + "\n")
        out.flush()
    return 0


# --- the driver ---------------------------------------------------------------------------------


class Worker:
    """A runtime's worker process (``serve``'s protocol): by default this script's ``--worker``;
    ``command`` runs another one (bench/int8.py's), which saves its output as ``out_{runtime}.npy``
    in ``work`` too."""

    def __init__(self, runtime: str, work: Path, threads: int, command: list[str] | None = None):
        self.runtime = runtime
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TVM_NUM_THREADS=str(threads), PYTHONHASHSEED="0")
        command = command or [sys.executable, __file__, "--worker", runtime, "--work", str(work), "--threads", str(threads)]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(work / f"{runtime}.log", "w"),  # noqa: SIM115 - lives as long as the worker
            text=True,
            env=env,
        )
        self.samples: list[float] = []
        self.round_medians: list[float] = []
        self.round_disturbed: list[bool] = []  # per round: the core-pair probe's verdict (time_rounds)
        self.status = ""
        self.valid = False
        self.load_s = float("nan")

    def handshake(self, want: np.ndarray, work: Path, check=None) -> None:
        """Read the worker's first line and check its output against ``want``: edgec's fp32 rule,
        or ``check(got, want) -> (valid, status)``."""
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            log = (work / f"{self.runtime}.log").read_text(errors="replace").strip().splitlines()
            line = json.dumps({"ok": False, "error": f"worker died ({self.process.returncode}): {log[-1] if log else ''}"})
        reply = json.loads(line)
        if not reply["ok"]:
            error = reply["error"]
            if "No module named" in error and self.runtime != "edgec":
                error += " (the peers install with: pip install -c constraints.txt -e '.[peers]')"
            self.status = f"FAILED: {error[:180]}"
            return
        self.load_s = reply["load_s"]
        got = np.load(work / f"out_{self.runtime}.npy").reshape(want.shape)
        if check is not None:
            self.valid, self.status = check(got, want)
            return
        from edgec.core.numerics import compare

        agreement = compare([got], [want], rtol=REL_TOLERANCE, atol=ABS_TOLERANCE)  # edgec's one rule
        self.valid = agreement.ok
        scale = float(np.max(np.abs(want)))
        self.status = f"{'ok' if self.valid else 'WRONG'} (max abs err {agreement.max_abs:.1e} of {scale:.1e})"

    def run(self, count: int) -> list[float]:
        self.process.stdin.write(f"{count}\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("\n")
                self.process.stdin.flush()
                self.process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()

    @property
    def median(self) -> float:
        return float(np.median(self.samples)) if self.samples else float("nan")


def prepare_model(name: str, work: Path) -> np.ndarray:
    """Write the model (traced TorchScript, ONNX as edgec exports it, its name) and the input; return PyTorch's output."""
    import torch

    import edgec
    import models

    module = models.build(name, seed=0)
    (work / "model.name").write_text(name)
    x = np.random.default_rng(0).standard_normal(models.INPUT_SHAPE, dtype=np.float32)
    # traced, not scripted: pnnx converts traced TorchScript only, and every runtime gets the same graph
    torch.jit.save(torch.jit.trace(module, torch.from_numpy(x)), str(work / "model.pt"))
    np.save(work / "input.npy", x)
    model = edgec.load(work / "model.pt", input_shape=models.INPUT_SHAPE)
    from edgec.compiler import save_onnx

    save_onnx(model.graph, work / "model.onnx")
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def bench_model(name: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"edgec-peers-{name}-") as directory:
        work = Path(directory)
        print(f"{name}: preparing", file=sys.stderr)
        want = prepare_model(name, work)
        workers = []
        for runtime in args.runtimes:  # one at a time: each loads/compiles with the machine to itself
            print(f"{name}: loading {runtime}", file=sys.stderr)
            current = Worker(runtime, work, args.threads)
            current.handshake(want, work)
            workers.append(current)
        try:
            time_rounds(workers, args.rounds, args.repeat, name, probe=args.probe)
        finally:
            for current in workers:
                current.close()
    return {"model": name, "workers": workers}


def time_rounds(workers: list[Worker], rounds: int, repeat: int, label: str, probe=None) -> None:
    """Warm up every worker that loaded, then ``rounds`` rounds in which each runs ``repeat``
    timed inferences in turn (a pause before each): samples and round medians on the workers.
    With ``probe`` (bench/core_pair.measure), the machine is probed after every pause (the
    previous runtime's threads idle by then) and once after the round: a block is disturbed
    when the probe before or after it found two threads unable to run at full speed together
    (``round_disturbed`` on the workers)."""
    live = [w for w in workers if w.status and not w.status.startswith("FAILED")]
    for current in live:
        current.run(3)  # warm-up
    for index in range(rounds):
        print(f"{label}: round {index + 1}/{rounds}", file=sys.stderr)
        shared = []
        for current in live:
            time.sleep(PAUSE_S)
            shared.append(probe().shared if probe else False)
            block = current.run(repeat)
            current.samples += block
            current.round_medians.append(float(np.median(block)))
        time.sleep(PAUSE_S)
        shared.append(probe().shared if probe else False)
        for position, current in enumerate(live):
            current.round_disturbed.append(shared[position] or shared[position + 1])


def best_peer_ratio(workers: list[Worker], undisturbed: bool = False) -> tuple[float, str, int] | None:
    """(median over rounds of edgec / best valid peer in that round, the peer that was best most
    often, the rounds counted); ``undisturbed``: only rounds in which no runtime's block was disturbed."""
    edgec = next((w for w in workers if w.runtime == "edgec" and w.valid and w.round_medians), None)
    peers = [w for w in workers if w.runtime != "edgec" and w.valid and w.round_medians]
    if edgec is None or not peers:
        return None
    live = [w for w in workers if w.round_medians]
    ratios, winners = [], []
    for index, mine in enumerate(edgec.round_medians):
        if undisturbed and any(w.round_disturbed[index] for w in live):
            continue
        best = min(peers, key=lambda w: w.round_medians[index])
        ratios.append(mine / best.round_medians[index])
        winners.append(best.runtime)
    if not ratios:
        return None
    return float(np.median(ratios)), max(set(winners), key=winners.count), len(ratios)


def table(results: list[dict], args) -> str:
    probed = args.probe is not None
    lines = [
        f"threads {args.threads}, {args.rounds} rounds x {args.repeat} runs, interleaved, each runtime in its own "
        "process; median ms over all runs; outputs vs PyTorch",
        "",
        "| model | " + " | ".join(args.runtimes) + " | edgec / best peer |" + (" undisturbed rounds |" if probed else ""),
        "|---|" + "---:|" * len(args.runtimes) + "---:|" + ("---:|" if probed else ""),
    ]
    notes = []
    for result in results:
        cells = []
        for current in result["workers"]:
            if current.valid:
                cells.append(f"{current.median:.2f}")
            else:
                cells.append("failed" if current.status.startswith("FAILED") else "wrong")
                notes.append(f"{result['model']} / {current.runtime}: {current.status}")
        ratio = best_peer_ratio(result["workers"])
        summary = f"{ratio[0]:.2f}x ({ratio[1]})" if ratio else "n/a"
        if probed:
            clean = best_peer_ratio(result["workers"], undisturbed=True)
            summary += f" | {clean[0]:.2f}x ({clean[1]}; {clean[2]} of {args.rounds})" if clean else f" | none of {args.rounds}"
        lines.append(f"| {result['model']} | " + " | ".join(cells) + f" | {summary} |")
    if probed:
        lines += [
            "",
            "undisturbed rounds: the ratio over the rounds in which bench/core_pair.py's probe, run after every "
            "pause, found two threads able to run at full speed together before and after every runtime's block "
            "(not two virtual CPUs on one physical core)",
        ]
    if notes:
        lines += ["", "Not counted:", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--threads", type=int, default=None, help="threads for every runtime [default: physical cores]")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("-o", "--output", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--json", type=Path, help="also write the raw samples here")
    parser.add_argument(
        "--no-core-probe", dest="core_probe", action="store_false",
        help="at 2+ threads, do not probe whether two threads can run at full speed together (bench/core_pair.py)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.work, args.threads)

    from edgec.targets.resolve import physical_cores

    args.threads = args.threads or physical_cores()
    args.runtimes = [name.strip() for name in args.runtimes.split(",")]
    unknown = sorted(set(args.runtimes) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown runtime(s) {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}")
    args.probe = None
    if args.core_probe and args.threads >= 2:
        import core_pair

        if core_pair.available("two-thread rounds are"):
            args.probe = core_pair.measure
    results = [bench_model(name.strip(), args) for name in args.models.split(",")]
    raw = {
        result["model"]: {
            w.runtime: {"samples": w.samples, "disturbed": w.round_disturbed, "status": w.status, "load_s": w.load_s}
            for w in result["workers"]
        }
        for result in results
    }
    publish(table(results, args), args.output, args.json, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
