"""torchvision corpus: every torchvision classification model, compiled by edgec and by plain TVM.

    python bench/torchvision_corpus.py                              # all 80 constructors, smallest first
    python bench/torchvision_corpus.py --models resnet18,mobilenet_v2 --emulate 2
    python bench/torchvision_corpus.py --budget-minutes 60 --timeout 1200 --json tv.json
    python bench/torchvision_corpus.py --table tv.json                # the tables of a (partial) run
    python bench/torchvision_corpus.py --models vit_b_32 --formats torchscript --x86-only --json spot.json

With ``--json`` the results are written after each model and models already in
the file are skipped: a cut-off run is resumed by running the same command again.

Per model (random weights, seeded; BatchNorm statistics randomised; eval mode;
input 1x3x224x224), in a process of its own (``--timeout`` bounds it):

- exported as TorchScript (``torch.jit.trace``) and as torch.export; for each:
  plain TVM (``from_onnx`` + ``relax.build`` for x86, built only) and ``edgec
  compile -t x86`` with the compiler's own check (ONNX Runtime and PyTorch,
  rtol/atol 1e-4: a mismatch fails the model);
- the TorchScript one also ``edgec compile`` for cortex-a53 and cortex-a7: for the
  first ``--emulate N`` models with the compiler's own check, which runs lib.so on
  the emulated board (qemu-user) against ONNX Runtime and PyTorch (status
  ``matches``); for the rest built only (``--no-verify``: status ``built``);
- the x86 artifact timed against ONNX Runtime on the same model.onnx, each
  runner in its own process, rounds alternated, ratio = median of per-round
  ratios (2 threads each, as bench/compare.py).

torchvision itself: PyPI's wheel does not import next to torch 2.13.0+cpu; its
model builders are pure Python. bench/models.py (``torchvision_models``) installs
it without dependencies into ~/.cache/edgec/torchvision and imports
``torchvision.models`` without running the package's ``__init__``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (1, 3, 224, 224)
SEED = 0
ARM = ("cortex-a53", "cortex-a7")
FORMATS = ("torchscript", "torch.export")


def import_torchvision():
    """torchvision's model builders (bench/models.py installs and imports them)."""
    import models as bench_models

    bench_models.torchvision_models()
    return sys.modules["torchvision"]


def model_names() -> list[str]:
    """Every classification constructor, fewest parameters first (from the weights' metadata)."""
    models = import_torchvision().models

    def params(name: str) -> int:
        weights = list(models.get_model_weights(name))
        return min(weight.meta.get("num_params", 1 << 40) for weight in weights) if weights else 1 << 40

    return sorted(models.list_models(module=models), key=lambda name: (params(name), name))


def build_model(name: str):
    """``name`` with seeded random weights and randomised BatchNorm statistics, in eval mode.

    Parameters torchvision initialises to zeros (the ViTs' classifier heads, biases) are
    drawn from N(0, 0.02) instead: a zero head makes every output 0 and the check vacuous.
    """
    import torch

    models = import_torchvision().models
    torch.manual_seed(SEED)
    model = models.get_model(name, weights=None)
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                channels = module.num_features
                module.running_mean.copy_(torch.rand(channels, generator=generator) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                    module.bias.copy_(torch.rand(channels, generator=generator) * 0.2 - 0.1)
    return model.eval()


def save(model, fmt: str, path: Path) -> None:
    import torch

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, (x,), check_trace=False), str(path))
        else:
            torch.export.save(torch.export.export(model, (x,)), str(path))


def output_scale(model) -> float:
    """max |output| of PyTorch on the seeded input: the check's atol (1e-4) weighs against it."""
    import torch

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        return float(model(x).abs().max())


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:200]


def plain_tvm(graph) -> dict:
    """from_onnx + relax.build for x86 on the ONNX edgec loaded: does plain TVM build it?"""
    import contextlib
    import io
    import warnings

    import onnx_ir as ir
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from edgec.targets import resolve

    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            relax.build(from_onnx(ir.serde.serialize_model(graph), keep_params_in_input=False), target=resolve("x86").tvm_target())
    except Exception as error:  # noqa: BLE001
        return {"status": "fails", "reason": one_line(error), "seconds": time.perf_counter() - start}
    return {"status": "builds", "seconds": time.perf_counter() - start}


def edgec_compile(path: Path, target: str, output: Path, verify: bool = True) -> dict:
    import edgec

    start = time.perf_counter()
    try:
        model = edgec.load(path, input_shape=SHAPE)
        result = edgec.compile(model, target, output, verify=verify)
    except Exception as error:  # noqa: BLE001 - EdgecError, or a bug in edgec
        return {"status": "fails", "reason": one_line(error), "seconds": time.perf_counter() - start}
    manifest = result.manifest
    verification = manifest["verification"]
    return {
        "status": "matches" if verification["status"] == "passed" else "built",
        "ran_on": verification.get("ran_on", verification.get("reason", "")),
        "seconds": time.perf_counter() - start,
        "max_abs": {name: verification[name]["max_abs"] for name in ("onnxruntime", "pytorch") if name in verification},
        "fallbacks": manifest["schedules"].get("fallbacks", []),
    }


def run_model(name: str, work: Path, arm_verify: bool = True, formats: tuple[str, ...] = FORMATS, arm: bool = True) -> dict:
    """Everything for one model, in this process; see the module docstring."""
    import edgec  # noqa: F401 - fail early if edgec is missing

    result: dict = {"model": name}
    try:
        model = build_model(name)
    except Exception as error:  # noqa: BLE001
        return {**result, "error": f"construct: {one_line(error)}"}
    result["params"] = sum(p.numel() for p in model.parameters())
    result["output_max_abs"] = output_scale(model)
    saved = {}
    for fmt, suffix in (("torchscript", "pt"), ("torch.export", "pt2")):
        if fmt not in formats:
            continue
        saved[fmt] = path = work / f"{name}.{suffix}"
        try:
            save(model, fmt, path)
        except Exception as error:  # noqa: BLE001
            result[fmt] = {"export": one_line(error)}
    del model  # the compiles load the files: no second copy of a 2.5 GB model (vit_h_14) in this process
    for fmt, path in saved.items():
        if fmt in result:
            continue
        suffix = path.suffix[1:]
        entry = {}
        try:
            import edgec

            entry["tvm"] = plain_tvm(edgec.load(path, input_shape=SHAPE).graph)
        except Exception as error:  # noqa: BLE001 - edgec.load failed: edgec_compile reports it
            entry["tvm"] = {"status": "not run", "reason": f"load: {one_line(error)}"}
        entry["x86"] = edgec_compile(path, "x86", work / f"{name}-{suffix}-x86")
        if fmt == "torchscript" and arm:
            for target in ARM:
                entry[target] = edgec_compile(path, target, work / f"{name}-{suffix}-{target}", verify=arm_verify)
        result[fmt] = entry
    return result


def time_runner(kind: str, path: Path, repeat: int) -> list[float]:
    """Milliseconds per run of edgec's artifact or ONNX Runtime on its model.onnx (this process only, 2 threads)."""
    from timing import edgec_timer, onnxruntime_timer  # bench/ is sys.path[0] when run as python bench/NAME.py

    x = np.random.default_rng(SEED).standard_normal(SHAPE).astype(np.float32)
    if kind == "edgec":
        import edgec
        from edgec.runtimes.local import LocalRunner

        return edgec_timer(LocalRunner(edgec.load_artifact(path), threads=2), [x], repeat, warmup=3)()
    import onnx_ir as ir

    from edgec.runtimes.reference import onnxruntime_session

    session = onnxruntime_session(ir.load(str(path / "model.onnx")), threads=2)
    return onnxruntime_timer(session, {session.get_inputs()[0].name: x}, repeat, warmup=3)()


TIMING_TIMEOUT_S = 600  # one timing process (load, warm-up, --repeat runs)


def measure(artifact: Path, rounds: int, repeat: int) -> dict:
    """edgec / ORT: each runner in its own process per round, rounds alternated."""
    medians = {"edgec": [], "ort": []}
    for _ in range(rounds):
        for kind in medians:
            try:
                done = subprocess.run([sys.executable, __file__, "--time", kind, str(artifact), "--repeat", str(repeat)],
                                      capture_output=True, text=True, timeout=TIMING_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                return {"error": f"{kind} timing: not done in {TIMING_TIMEOUT_S} s ({repeat} runs + 3 warm-up)"}
            if done.returncode != 0:
                return {"error": f"{kind} timing: {(done.stderr.strip().splitlines() or ['?'])[-1][:160]}"}
            medians[kind].append(statistics.median(json.loads(done.stdout.strip().splitlines()[-1])))
    ratios = [e / o for e, o in zip(medians["edgec"], medians["ort"], strict=True)]
    return {"edgec_ms": statistics.median(medians["edgec"]), "ort_ms": statistics.median(medians["ort"]),
            "ratio": statistics.median(ratios)}


def status(entry: dict) -> tuple[str, str]:
    """(status, reason) of one format's x86 result, judged against plain TVM."""
    if "export" in entry:
        return "export fails", entry["export"]
    x86, tvm = entry.get("x86", {}), entry.get("tvm", {})
    if x86.get("status") == "matches":
        fell = len(x86.get("fallbacks", []))
        return "ok", f"{fell} fallbacks" if fell else ""
    reason = x86.get("reason", "")
    if tvm.get("status") == "builds":
        return "FAILS (TVM builds)", reason
    return "fails (TVM too)", reason


def emulated_on_boards(result: dict) -> bool:
    """Did both ARM builds of ``result`` run on their emulated boards and match?"""
    entry = result.get("torchscript", {})
    return all(entry.get(target, {}).get("status") == "matches" for target in ARM)


def summary(result: dict) -> str:
    """One line per model for the progress log."""
    if "error" in result:
        return result["error"]
    parts = []
    for fmt in ("torchscript", "torch.export"):
        if fmt in result:
            state, reason = status(result[fmt])
            parts.append(f"{fmt}: {state}{' (' + reason + ')' if reason else ''}")
    entry = result.get("torchscript", {})
    parts.extend(f"{target}: {entry[target].get('status')}" for target in ARM if target in entry)
    if "timing" in entry:
        parts.append(f"edgec/ORT {entry['timing'].get('ratio', entry['timing'].get('error'))}")
    return "; ".join(parts)


def _cell(entry: dict | None, key: str) -> str:
    """One format's state for plain TVM (``tvm``) or edgec (``x86``, an ARM preset)."""
    if entry is None:
        return "-"
    if "export" in entry:
        return "export fails"
    state = entry.get(key, {}).get("status", "-")
    return {"builds": "ok", "matches": "ok", "not run": "no ONNX"}.get(state, state)


def print_table(results: list[dict], not_measured: dict[str, str] | None = None) -> None:
    """The README's table: one row per model, then each failure's reason, then what was not measured."""
    print("| model | params | plain TVM x86 (TS / EP) | edgec x86 (TS / EP) | compile s (TS / EP) "
          "| edgec ms | ORT ms | edgec / ORT (median of rounds) | cortex-a53 | cortex-a7 | emulated boards |")
    print("|---|---:|---|---|---:|---:|---:|---:|---|---|---|")
    reasons = []
    for result in results:
        name = result["model"]
        if "error" in result:
            print(f"| {name} | | | | | | | | | | {result['error']} |")
            continue
        entries = [result.get(fmt) for fmt in FORMATS]
        seconds = [f"{entry['x86']['seconds']:.0f}" if entry and "seconds" in entry.get("x86", {}) else "-" for entry in entries]
        timing = (entries[0] or {}).get("timing", {})
        arm = [(entries[0] or {}).get(target, {}).get("status", "-") for target in ARM]  # matches (on the board), built
        emulated = [target for target in ARM if (entries[0] or {}).get(target, {}).get("status") == "matches"]
        cells = [
            name, f"{result['params'] / 1e6:.1f}M",
            " / ".join(_cell(entry, "tvm") for entry in entries), " / ".join(_cell(entry, "x86") for entry in entries),
            " / ".join(seconds),
            f"{timing['edgec_ms']:.1f}" if "edgec_ms" in timing else "",
            f"{timing['ort_ms']:.1f}" if "ort_ms" in timing else "",
            _ratio_cell(timing),
            *arm,
            "both match ORT and PyTorch" if len(emulated) == len(ARM) else ", ".join(emulated) or "-",
        ]
        print("| " + " | ".join(cells) + " |")
        for fmt, entry in zip(FORMATS, entries, strict=True):
            if entry is None:
                continue
            state, reason = status(entry)
            if state != "ok":
                reasons.append(f"- {name} ({fmt}): {state}: {reason}")
            reasons.extend(f"- {name} ({fmt}, {target}): {entry[target].get('reason', '')}"
                           for target in ARM if entry.get(target, {}).get("status") == "fails")
    if reasons:
        print("\nFailures:\n")
        print("\n".join(reasons))
    if not_measured:
        by_reason: dict[str, list[str]] = {}
        for name, why in not_measured.items():
            by_reason.setdefault(why, []).append(name)
        print("\nNot measured:\n")
        print("\n".join(f"- {why} ({len(names)}): {', '.join(names)}" for why, names in by_reason.items()))


def _ratio_cell(timing: dict) -> str:
    """edgec / ORT as the ratio of the two medians, and the median of the per-round ratios beside
    it: the two differ when load moved between rounds (then neither says much)."""
    if "ratio" not in timing:
        return timing.get("error", "")
    return f"{timing['edgec_ms'] / timing['ort_ms']:.2f}x ({timing['ratio']:.2f}x)"


def measured(path: Path) -> list[dict]:
    """The results already in ``path`` (resuming a cut-off run), less models that were never run."""
    if not path.exists():
        return []
    return [result for result in json.loads(path.read_text()) if not result.get("error", "").startswith("not run")]


def write_json(path: Path, results: list[dict]) -> None:
    """Write the results after each model, through a rename, so a cut-off run keeps what it measured."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=1))
    partial.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated constructor names [default: all, fewest parameters first]")
    parser.add_argument("--limit", type=int, help="only the first N models")
    parser.add_argument("--budget-minutes", type=float, default=None, help="start no model after this much time")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model (compiles; timing is extra)")
    parser.add_argument("--emulate", type=int, default=3,
                        help="check the ARM builds of the first N models on emulated boards (the rest: built only)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the results here after each model; models already in it are skipped")
    parser.add_argument("--table", type=Path, metavar="JSON", help="print the tables of a results file and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-arm-verify", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated export formats [default: both]")
    parser.add_argument("--x86-only", action="store_true", help="a spot check: plain TVM and edgec x86 only (no ARM, no timing)")
    parser.add_argument("--time", nargs=2, metavar=("KIND", "ARTIFACT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time:
        print(json.dumps(time_runner(args.time[0], Path(args.time[1]), args.repeat)))
        return 0
    if args.worker:
        formats = tuple(args.formats.split(","))
        print(json.dumps(run_model(args.worker, args.work, not args.no_arm_verify, formats, arm=not args.x86_only)))
        return 0
    if args.table:
        results = json.loads(args.table.read_text())
        done_names = {result["model"] for result in results}
        print_table(results, {name: "not reached" for name in model_names() if name not in done_names})
        return 0
    names = args.models.split(",") if args.models else model_names()
    names = names[: args.limit] if args.limit else names
    results = measured(args.json) if args.json else []
    done_names = {result["model"] for result in results}
    emulated = sum(1 for result in results if emulated_on_boards(result))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgec-torchvision-") as root:
        for index, name in enumerate(names, 1):
            if name in done_names:
                print(f"[{index}/{len(names)}] {name}: in {args.json}, skipped", file=sys.stderr, flush=True)
                continue
            if args.budget_minutes is not None and time.perf_counter() - start > 60 * args.budget_minutes:
                results.extend({"model": left, "error": "not run: --budget-minutes spent"}
                               for left in names[index - 1 :] if left not in done_names)
                break
            work = Path(root) / name
            work.mkdir()
            print(f"[{index}/{len(names)}] {name}", file=sys.stderr, flush=True)
            try:
                options = [] if emulated < args.emulate else ["--no-arm-verify"]
                options += ["--formats", args.formats] + (["--x86-only"] if args.x86_only else [])
                done = subprocess.run([sys.executable, __file__, "--worker", name, "--work", str(work), *options],
                                      capture_output=True, text=True, timeout=args.timeout, check=False)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                result = json.loads(lines[-1]) if lines else {
                    "model": name, "error": f"worker exited {done.returncode}: {(done.stderr.strip().splitlines() or ['?'])[-1][:160]}"}
            except subprocess.TimeoutExpired:
                result = {"model": name, "error": f"timed out after {args.timeout:g} s"}
            entry = result.get("torchscript", {})
            if entry.get("x86", {}).get("status") == "matches" and not args.x86_only:
                entry["timing"] = measure(work / f"{name}-pt-x86", args.rounds, args.repeat)
            emulated += emulated_on_boards(result)
            results.append(result)
            print(f"    {summary(result)}", file=sys.stderr, flush=True)
            subprocess.run(["rm", "-rf", str(work)], check=False)
            if args.json:
                write_json(args.json, results)
        if args.json:
            write_json(args.json, results)
    print(f"{len(results)} models in {time.perf_counter() - start:.0f} s\n")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
