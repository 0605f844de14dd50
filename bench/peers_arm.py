"""edgec against ncnn on emulated ARM boards, in instructions per inference.

No ARM board here, and emulated time means nothing, but instructions do: an
emulated board counts, deterministically, the ARM instructions the code runs
(edgec's QEMU plugin, one counter per thread, see agent/plugin/icount.c).

    python bench/peers_arm.py                       # every row below, both boards
    python bench/peers_arm.py --rows mobilenet_v2:dense resnet18:1x4 --boards cortex-a7
    python bench/peers_arm.py --json counts.json

Rows (``--rows MODEL:VARIANT``), each model 1x3x224x224, seeded weights:

    mobilenet_v2, resnet18, shufflenet_v2_x0_5, mobilenet_v3_small   bench/models.py
        dense   edgec with fold-bn; ncnn beside it
        1x4     edgec with fold-bn and block-sparse:n=4,sparsity=0.7 (1xN, the paper's N=4 / 70%)
    bnn_resnet18    bench/binary.py's Bi-Real-style ResNet-18 BNN
        fp32    edgec with fold-bn (float convolutions on Sign activations); ncnn beside it
        binary  edgec with fold-bn and binary (xnor/popcount convolutions)

Each number comes from its own process: edgec compiles each row for each
board (`edgec compile`), `edgec device emulate` runs the boards, `edgec
bench --json` checks the board's outputs against its reference and counts
one inference twice (equal counts: deterministic). ncnn: pnnx (x86) converts
the traced model; ncnn's aarch64 wheel runs in an arm64 Python under
qemu-aarch64 -cpu cortex-a53 with the same plugin, one thread
(bench/ncnn_guest.py), its output checked against PyTorch; a wrong output is
shown as wrong and its count is not compared. ncnn has no armv7 wheel on
PyPI: on cortex-a7 the table gives edgec's instructions per MAC alone.

Built and cached on first use under ~/.cache/edgec/peers/ (network): the
arm64 userland (Debian bookworm's python3.11 arm64 packages, fetched with
apt-get download into a private apt state, unpacked with dpkg -x: nothing is
installed on this machine), ncnn's and numpy's aarch64 wheels, and pnnx.

Instructions are not time: a board's time also depends on caches, stalls and
what each instruction costs (a 4-lane multiply-add counts one, like an add).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

SHAPE = (1, 3, 224, 224)
PEER_BOARD = "cortex-a53"  # where ncnn's aarch64 wheel runs
BOARDS = ("cortex-a7", "cortex-a53")
# edgec's passes per variant (fold-bn everywhere, so that every variant starts from the same graph)
VARIANTS = {
    "dense": ("fold-bn",),
    "1x4": ("fold-bn", "block-sparse:n=4,sparsity=0.7"),
    "fp32": ("fold-bn",),
    "binary": ("fold-bn", "binary"),
}
PEER_VARIANTS = ("dense", "fp32")  # ncnn runs the float model
ROWS = (
    "mobilenet_v2:dense", "mobilenet_v2:1x4", "resnet18:dense", "resnet18:1x4",
    "shufflenet_v2_x0_5:dense", "mobilenet_v3_small:dense", "bnn_resnet18:fp32", "bnn_resnet18:binary",
)  # fmt: skip
RATIOS = (("mobilenet_v2", "1x4", "dense"), ("resnet18", "1x4", "dense"), ("bnn_resnet18", "binary", "fp32"))
PEER_TOLERANCE = 1e-3  # ncnn vs PyTorch: max |difference| <= this x max |PyTorch output| (wrong conversions are far off)

# What the arm64 userland is made of (Debian bookworm, arm64) and what runs in it.
DEBIAN_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libexpat1", "zlib1g",
    "libffi8", "libstdc++6", "libgcc-s1", "libgomp1",
)  # fmt: skip
GUEST_WHEELS = ("ncnn==1.0.20261020", "numpy==2.4.6")
GUEST_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
PNNX = "pnnx==20261020"
GUEST_ENV = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(command: list[str], *, timeout: float, env: dict | None = None, cwd: Path | None = None) -> str:
    """Run ``command``; its stdout, or SystemExit with its last lines of stderr."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(map(str, command[:4]))} ... failed ({done.returncode}):\n{tail}")
    return done.stdout


# --------------------------------------------------------------------------
# Cached tools: the arm64 userland with ncnn, and pnnx
# --------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgec" / "peers"


def _build_once(target: Path, build) -> Path:
    """``build(partial_dir)`` into a fresh partial directory, renamed to ``target`` when complete."""
    if target.is_dir():
        return target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        build(partial)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def arm64_userland() -> Path:
    """An arm64 root with Debian's python3.11 and ncnn + numpy in ``site/``: ``root/usr/bin/python3.11``."""
    name = "arm64-python3.11-" + "-".join(spec.replace("==", "") for spec in GUEST_WHEELS)

    def build(partial: Path) -> None:
        apt = partial / "apt"
        for sub in ("lists/partial", "cache/archives/partial", "debs"):
            (apt / sub).mkdir(parents=True)
        (apt / "status").touch()
        options = [
            "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64", "-o", f"Dir::State::Lists={apt / 'lists'}",
            "-o", f"Dir::Cache={apt / 'cache'}", "-o", f"Dir::State::status={apt / 'status'}",
        ]  # fmt: skip
        log("peers: fetching Debian's arm64 python3.11 (apt-get download, private apt state)")
        run(["apt-get", *options, "-qq", "update"], timeout=600)
        run(["apt-get", *options, "download", *DEBIAN_PACKAGES], timeout=600, cwd=apt / "debs")
        for deb in sorted((apt / "debs").glob("*.deb")):
            run(["dpkg", "-x", str(deb), str(partial / "root")], timeout=120)
        shutil.rmtree(apt)
        log(f"peers: installing {', '.join(GUEST_WHEELS)} (aarch64 wheels)")
        platforms = [argument for platform in GUEST_PLATFORMS for argument in ("--platform", platform)]
        run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:",
             *platforms, "--python-version", "3.11", "--target", str(partial / "site"), *GUEST_WHEELS], timeout=900)  # fmt: skip

    return _build_once(cache_dir() / name, build)


def pnnx_binary() -> Path:
    def build(partial: Path) -> None:
        log(f"peers: installing {PNNX}")
        run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--target", str(partial), PNNX],
            timeout=900)  # fmt: skip
        (partial / "pnnx" / "pnnx").chmod(0o755)

    return _build_once(cache_dir() / PNNX.replace("==", "-"), build) / "pnnx" / "pnnx"


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def build_model(name: str):
    import torch

    if name == "bnn_resnet18":
        from binary import build_bnn_resnet18

        return build_bnn_resnet18()
    import models

    if hasattr(models, "build"):  # bench/models.py with torchvision's builders
        return models.build(name)
    if name not in models.MODELS:
        raise SystemExit(f"bench/models.py has no model {name!r} (known: {', '.join(models.MODELS)}); it needs torchvision's builders")
    torch.manual_seed(0)
    return models.MODELS[name]()


@dataclasses.dataclass
class Model:
    name: str
    traced: Path  # TorchScript, traced: what edgec compiles and pnnx converts
    input: Path  # x.npy
    reference: np.ndarray  # PyTorch's output on it
    macs: int = 0


def prepare(name: str, workdir: Path) -> Model:
    import torch

    directory = workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    module = build_model(name).eval()
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, torch.from_numpy(x))
        reference = module(torch.from_numpy(x)).numpy()
    torch.jit.save(traced, str(directory / f"{name}.pt"))
    np.save(directory / "x.npy", x)
    return Model(name, directory / f"{name}.pt", directory / "x.npy", reference)


# --------------------------------------------------------------------------
# edgec on emulated boards
# --------------------------------------------------------------------------

EDGEC = [sys.executable, "-m", "edgec.cli"]


@contextlib.contextmanager
def emulated_boards(boards: tuple[str, ...]):
    """`edgec device emulate` per board (counting instructions); yields board -> 'host:port'."""
    processes, addresses = [], {}
    try:
        for board in boards:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            process = subprocess.Popen([*EDGEC, "device", "emulate", "-t", board, "--port", str(port)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
            processes.append(process)
            _wait_listening(process, port, timeout=1800)  # the first call builds the agent (minutes)
            addresses[board] = f"127.0.0.1:{port}"
            log(f"peers: emulated {board} on {addresses[board]}")
        yield addresses
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)


def _wait_listening(process: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`edgec device emulate` exited: {process.stderr.read()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            return
        time.sleep(0.5)
    raise RuntimeError(f"no emulated board on port {port} after {timeout:g} s")


def edgec_count(model: Model, variant: str, board: str, address: str, workdir: Path) -> dict:
    """Compile (own process), then bench on the emulated board (own process): its JSON, trimmed."""
    artifact = workdir / model.name / f"{variant}_{board}"
    passes = [argument for spec in VARIANTS[variant] for argument in ("-p", spec)]
    shape = ",".join(map(str, SHAPE))
    try:
        run([*EDGEC, "compile", str(model.traced), "--input-shape", shape, "-t", board, *passes, "-o", str(artifact), "--json"],
            timeout=3600)  # fmt: skip
        bench = json.loads(run([*EDGEC, "bench", str(artifact), "--rpc", address, "-i", str(model.input),
                                "--repeat", "1", "--warmup", "0", "--json"], timeout=3600))  # fmt: skip
    except RuntimeError as error:
        return {"error": str(error).splitlines()[-1]}
    counted = bench["instructions"]
    return {
        "instructions": counted["per_inference"], "runs": counted["runs"], "deterministic": counted["deterministic"],
        "per_mac": counted["per_mac"], "macs": bench["macs"], "check": bench["check"],
    }  # fmt: skip


# --------------------------------------------------------------------------
# ncnn in the arm64 userland
# --------------------------------------------------------------------------


def ncnn_count(model: Model, workdir: Path, plugin: Path, userland: Path, pnnx: Path) -> dict:
    directory = workdir / model.name / "ncnn"
    directory.mkdir(parents=True, exist_ok=True)
    traced = directory / model.traced.name
    shutil.copy2(model.traced, traced)
    try:
        # fp16=0: float32 weights, as edgec's (pnnx stores ncnn weights as float16 by default, which
        # moved MobileNetV2's outputs by 1% of their range)
        run([str(pnnx), traced.name, f"inputshape=[{','.join(map(str, SHAPE))}]", "fp16=0"], timeout=900, cwd=directory)
    except RuntimeError as error:
        return {"error": f"pnnx: {str(error).splitlines()[-1]}"}
    stem = traced.stem
    output = directory / "output.npy"
    root = userland / "root"
    command = [
        shutil.which("qemu-aarch64") or "qemu-aarch64", "-L", str(root), "-cpu", PEER_BOARD, "-plugin", str(plugin),
        str(root / "usr" / "bin" / "python3.11"), str(ROOT / "bench" / "ncnn_guest.py"),
        str(ROOT / "runtimes" / "guest_counter.py"), f"{stem}.ncnn.param", f"{stem}.ncnn.bin", str(model.input), str(output),
    ]  # fmt: skip
    env = {**GUEST_ENV, "PYTHONPATH": str(userland / "site"), "PATH": os.environ.get("PATH", "/usr/bin")}
    try:
        counts = json.loads(run(command, timeout=3600, env=env, cwd=directory).strip().splitlines()[-1])
    except RuntimeError as error:
        return {"error": f"ncnn: {str(error).splitlines()[-1]}"}
    got = np.load(output).reshape(model.reference.shape)
    max_abs = float(np.abs(got - model.reference).max())
    scale = float(np.abs(model.reference).max())
    runs = counts["instructions"]
    return {
        "instructions": int(np.median(runs)), "runs": runs, "deterministic": len(set(runs)) == 1,
        "other_threads": max(counts["other_threads"]),
        "check": {"reference": "pytorch", "ok": max_abs <= PEER_TOLERANCE * scale, "max_abs": max_abs, "max_abs_output": scale},
    }  # fmt: skip


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _cell(result: dict | None) -> str:
    if result is None:
        return ""
    if "error" in result:
        return f"failed: {result['error'][:60]}"
    text = f"{result['instructions'] / 1e6:,.1f}M"
    if not result["deterministic"]:
        text += f" (runs {', '.join(f'{run:,}' for run in result['runs'])})"
    if not result["check"]["ok"]:
        text += f" WRONG (max abs {result['check']['max_abs']:.2g})"
    return text


def _per_mac(result: dict | None, macs: int) -> str:
    if not result or "error" in result or macs <= 0:
        return ""
    return f"{result['instructions'] / macs:.2f}"


def report(results: dict, boards: tuple[str, ...]) -> str:
    lines = []
    head = ["model", "variant", "MACs"]
    for board in boards:
        head += [f"edgec {board}", "per MAC"]
    head += [f"ncnn {PEER_BOARD}", "per MAC", "edgec / ncnn"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in results.items():
        name, variant = key.split(":")
        macs = next((cell["macs"] for cell in row["edgec"].values() if "macs" in cell), 0)  # the compiled graph's
        cells = [name, variant, f"{macs / 1e6:,.0f}M"]
        for board in boards:
            cells += [_cell(row["edgec"].get(board)), _per_mac(row["edgec"].get(board), macs)]
        peer, mine = row.get("ncnn"), row["edgec"].get(PEER_BOARD)
        ratio = ""
        if peer and mine and "error" not in peer and "error" not in mine and peer["check"]["ok"] and mine["check"]["ok"]:
            ratio = f"{mine['instructions'] / peer['instructions']:.2f}x"
        cells += [_cell(peer), _per_mac(peer, macs), ratio]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, variant, base in RATIOS:
        for board in boards:
            a = results.get(f"{name}:{variant}", {}).get("edgec", {}).get(board)
            b = results.get(f"{name}:{base}", {}).get("edgec", {}).get(board)
            if a and b and "error" not in a and "error" not in b:
                lines.append(
                    f"{name} {variant} vs {base} on {board}: {a['instructions']:,} / {b['instructions']:,} instructions = "
                    f"{a['instructions'] / b['instructions']:.3f} ({b['instructions'] / a['instructions']:.2f}x fewer)"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), metavar="MODEL:VARIANT", help="rows to measure [default: all]")
    parser.add_argument("--boards", nargs="+", default=list(BOARDS), choices=BOARDS, help="emulated boards for edgec")
    parser.add_argument("--no-peer", action="store_true", help="edgec only (no ncnn)")
    parser.add_argument("--workdir", type=Path, help="keep artifacts and conversions here [default: a temporary directory]")
    parser.add_argument("--json", type=Path, help="also write every count as JSON")
    args = parser.parse_args()
    for row in args.rows:
        if row.count(":") != 1 or row.split(":")[1] not in VARIANTS:
            parser.error(f"bad row {row!r}: write MODEL:VARIANT, VARIANT one of {', '.join(VARIANTS)}")
    boards = tuple(args.boards)

    from edgec.runtimes.agent_build import build_agent, build_counter_plugin

    plugin = build_counter_plugin()
    for board in boards:
        build_agent(board)  # cached after the first time; minutes before
    peer = not args.no_peer and any(row.split(":")[1] in PEER_VARIANTS for row in args.rows)
    userland, pnnx = (arm64_userland(), pnnx_binary()) if peer else (None, None)

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peers_arm-")))
        addresses = stack.enter_context(emulated_boards(boards))
        models: dict[str, Model | None] = {}
        results: dict[str, dict] = {}
        for row in args.rows:
            name, variant = row.split(":")
            if name not in models:
                log(f"peers: {name}: building the PyTorch model")
                try:
                    models[name] = prepare(name, workdir)
                except (SystemExit, Exception) as error:  # noqa: BLE001 - one model's failure is one row's
                    log(f"peers: {name}: {error}")
                    models[name] = None
            if models[name] is None:
                continue
            results[row] = {"edgec": {}}
            for board in boards:
                start = time.perf_counter()
                results[row]["edgec"][board] = edgec_count(models[name], variant, board, addresses[board], workdir)
                log(f"peers: {row} edgec {board}: {_cell(results[row]['edgec'][board])} ({time.perf_counter() - start:.0f} s)")
            if peer and variant in PEER_VARIANTS:
                start = time.perf_counter()
                results[row]["ncnn"] = ncnn_count(models[name], workdir, plugin, userland, pnnx)
                log(f"peers: {row} ncnn {PEER_BOARD}: {_cell(results[row]['ncnn'])} ({time.perf_counter() - start:.0f} s)")
    print(report(results, boards))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
