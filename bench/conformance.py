"""Conformance corpus: edgec (defaults, x86) against plain TVM Relax on the ONNX test data
that ships inside the ``onnx`` wheel.

    python bench/conformance.py                     # the whole corpus, 2 cases at a time
    python bench/conformance.py --jobs 1 --limit 20 --timeout 300 --json results.json
    python bench/conformance.py --only light_ --only Conv2d

Cases (``onnx/backend/test/data``):

- ``simple``, ``pytorch-converted``, ``pytorch-operator``: a ``model.onnx`` with
  ``test_data_set_*/input_*.pb`` and ``output_*.pb``; every data set is checked.
- ``light/light_*.onnx``: model-zoo CNNs whose weights are constant subgraphs
  (ConstantOfShape); run on a seeded random input against ONNX Runtime.

Cases run in ``--jobs`` child processes, one case after another in each (a crash
or a hang costs that case only, ``--timeout`` seconds at most, and the next case
gets a fresh process); each case is compiled twice there:

- plain TVM: ``relax.frontend.onnx.from_onnx`` + ``relax.build`` for edgec's x86
  target, run on TVM's Relax VM;
- edgec: ``edgec.load`` (the data set's input shapes as ``input_shape``) +
  ``edgec.compile(model, "x86", ...)`` with its defaults (schedule library on,
  verification on), run with ``LocalRunner``.

A side passes a case when it builds and every output of every data set has the
expected shape and matches within ``--rtol``/``--atol`` (NaN where the
reference is NaN counts as a match; integer and boolean outputs must be equal).
The table counts the cases each side passes and the cases plain TVM passes and
edgec fails (the number that must be zero); the failures follow with one-line
reasons. Nothing here times anything: compile seconds are informative only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CATEGORIES = ("simple", "pytorch-converted", "pytorch-operator", "light")
RTOL = 1e-3  # the ONNX backend test runner's default relative tolerance
ATOL = 1e-5
SEED = 0


@dataclasses.dataclass(frozen=True)
class Case:
    """One model of the corpus: ``data_sets`` empty means seeded input + ONNX Runtime."""

    name: str
    category: str
    model: Path
    data_sets: tuple[Path, ...]


@dataclasses.dataclass
class Outcome:
    """What one side (``tvm`` or ``edgec``) did with a case."""

    passed: bool
    reason: str = ""
    seconds: float = 0.0
    fallbacks: int = 0


def data_root() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def discover(root: Path | None = None, categories=CATEGORIES) -> list[Case]:
    """Every case of the corpus, in a stable order."""
    root = root or data_root()
    cases = []
    for category in categories:
        folder = root / category
        if not folder.is_dir():
            continue
        if category == "light":
            for model in sorted(folder.glob("light_*.onnx")):
                cases.append(Case(model.stem, category, model, ()))
            continue
        for case_dir in sorted(path for path in folder.iterdir() if (path / "model.onnx").is_file()):
            data_sets = tuple(sorted(case_dir.glob("test_data_set_*")))
            cases.append(Case(case_dir.name, category, case_dir / "model.onnx", data_sets))
    return cases


def read_tensors(folder: Path, prefix: str) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    arrays = []
    for index in range(len(list(folder.glob(f"{prefix}_*.pb")))):
        tensor = onnx.TensorProto()
        tensor.ParseFromString((folder / f"{prefix}_{index}.pb").read_bytes())
        arrays.append(numpy_helper.to_array(tensor))
    return arrays


def graph_inputs(model_path: Path) -> list:
    """The model's real inputs (ValueInfoProto), initializers listed as inputs left out."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    initializers = {tensor.name for tensor in proto.graph.initializer}
    return [value for value in proto.graph.input if value.name not in initializers]


def data_sets_of(case: Case) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """(inputs, expected outputs) per data set; light models: a seeded input and ONNX Runtime."""
    if case.data_sets:
        return [(read_tensors(folder, "input"), read_tensors(folder, "output")) for folder in case.data_sets]
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(SEED)
    inputs = []
    for value in graph_inputs(case.model):
        dims = [dim.dim_value or 1 for dim in value.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        inputs.append(rng.standard_normal(dims).astype(dtype))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(case.model), options, providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    return [(inputs, list(session.run(None, dict(zip(names, inputs, strict=True)))))]


def compare(got: list[np.ndarray], want: list[np.ndarray], rtol: float, atol: float) -> str:
    """'' when ``got`` matches ``want``, else why not (one line)."""
    if len(got) != len(want):
        return f"{len(got)} outputs, expected {len(want)}"
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        g, w = np.asarray(g), np.asarray(w)
        if g.shape != w.shape:
            return f"output {index} has shape {g.shape}, expected {w.shape}"
        if w.dtype.kind in "biu" or w.dtype == object:
            if not np.array_equal(g, w):
                return f"output {index} differs (exact dtype {w.dtype})"
            continue
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        if not np.allclose(g64, w64, rtol=rtol, atol=atol, equal_nan=True):
            error = np.abs(g64 - w64)
            finite = np.isfinite(error)
            worst = float(error[finite].max()) if finite.any() else float("nan")
            return f"output {index} differs: max abs error {worst:.3g} (rtol {rtol:g}, atol {atol:g})"
    return ""


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return f"{type(error).__name__}: {text}"[:240]


def run_plain_tvm(case: Case, data, rtol: float, atol: float) -> Outcome:
    """from_onnx + relax.build for edgec's x86 target, as a user of plain TVM would."""
    import contextlib
    import io
    import warnings

    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from edgec.runtimes.local import flatten_outputs
    from edgec.targets import resolve

    start = time.perf_counter()
    try:
        proto = onnx.load(str(case.model))
        shapes = {value.name: list(array.shape) for value, array in zip(graph_inputs(case.model), data[0][0], strict=False)}
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            mod = from_onnx(proto, shape_dict=shapes, keep_params_in_input=False)
            executable = relax.build(mod, target=resolve("x86").tvm_target())
        vm = relax.VirtualMachine(executable, tvm.cpu())
        seconds = time.perf_counter() - start
        for inputs, expected in data:
            got = flatten_outputs(vm["main"](*(tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs)))
            reason = compare(got, expected, rtol, atol)
            if reason:
                return Outcome(False, reason, seconds)
    except Exception as error:  # noqa: BLE001 - any failure is this side's result
        return Outcome(False, one_line(error), time.perf_counter() - start)
    return Outcome(True, "", seconds)


def run_edgec(case: Case, data, rtol: float, atol: float, workdir: Path) -> Outcome:
    """edgec.load + edgec.compile with the defaults for x86, then the artifact on every data set."""
    import edgec
    from edgec.runtimes.local import LocalRunner

    start = time.perf_counter()
    try:
        first_inputs = data[0][0]
        shapes = {value.name: list(array.shape) for value, array in zip(graph_inputs(case.model), first_inputs, strict=False)}
        model = edgec.load(case.model, input_shape=shapes or None)
        result = edgec.compile(model, "x86", workdir / "artifact")
        seconds = time.perf_counter() - start
        fallbacks = len(result.manifest.get("schedules", {}).get("fallbacks", []))
        runner = LocalRunner(result.artifact)
        for inputs, expected in data:
            got = runner.run([np.ascontiguousarray(x) for x in inputs])
            reason = compare(got, expected, rtol, atol)
            if reason:
                return Outcome(False, reason, seconds, fallbacks)
    except Exception as error:  # noqa: BLE001 - EdgecError and anything else escaping edgec
        return Outcome(False, one_line(error), time.perf_counter() - start)
    return Outcome(True, "", seconds, fallbacks)


def run_case(case: Case, rtol: float = RTOL, atol: float = ATOL) -> dict:
    """Both sides on one case, in this process."""
    try:
        data = data_sets_of(case)
    except Exception as error:  # noqa: BLE001 - unreadable data: neither side can be judged
        failed = Outcome(False, f"test data: {one_line(error)}")
        return {"tvm": dataclasses.asdict(failed), "edgec": dataclasses.asdict(failed)}
    tvm_outcome = run_plain_tvm(case, data, rtol, atol)
    with tempfile.TemporaryDirectory(prefix="edgec-conformance-") as workdir:
        edgec_outcome = run_edgec(case, data, rtol, atol, Path(workdir))
    return {"tvm": dataclasses.asdict(tvm_outcome), "edgec": dataclasses.asdict(edgec_outcome)}


class Worker:
    """A child process that runs cases one after another (TVM and torch imported once): a crash
    or a case over ``timeout`` costs that case only, and the next case gets a fresh child."""

    def __init__(self, timeout: float, rtol: float, atol: float):
        self.timeout, self.rtol, self.atol = timeout, rtol, atol
        self.process = None

    def _start(self) -> None:
        import queue
        import threading

        command = [sys.executable, __file__, "--serve", "--rtol", str(self.rtol), "--atol", str(self.atol)]
        env = {**os.environ, "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS", "1")}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, env=env, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda out=self.process.stdout, lines=self.lines: [lines.put(line) for line in out] and None
                         or lines.put(None), daemon=True).start()

    def run(self, case: Case) -> dict:
        import queue

        if self.process is None or self.process.poll() is not None:
            self._start()
        self.process.stdin.write(json.dumps(dataclasses.asdict(case), default=str) + "\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                failed = dataclasses.asdict(Outcome(False, f"timed out after {self.timeout:g} s", self.timeout))
                return {"tvm": failed, "edgec": failed}
            if line is None:  # the child died on this case
                code = self.process.wait()
                self.process = None
                failed = dataclasses.asdict(Outcome(False, f"the process running it died (status {code})"))
                return {"tvm": failed, "edgec": failed}
            if line.startswith("{"):
                return json.loads(line)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()
        self.process = None


def serve(rtol: float, atol: float) -> None:
    """The child's side of ``Worker``: one case (JSON) per line in, one result per line out."""
    for line in sys.stdin:
        fields = json.loads(line)
        case = Case(fields["name"], fields["category"], Path(fields["model"]), tuple(Path(p) for p in fields["data_sets"]))
        print(json.dumps(run_case(case, rtol, atol)), flush=True)


def summarise(results: dict[str, dict]) -> dict[str, int]:
    tvm_pass = {name for name, result in results.items() if result["tvm"]["passed"]}
    edgec_pass = {name for name, result in results.items() if result["edgec"]["passed"]}
    return {
        "cases": len(results),
        "edgec pass": len(edgec_pass),
        "TVM pass": len(tvm_pass),
        "TVM passes, edgec fails": len(tvm_pass - edgec_pass),
        "edgec passes, TVM fails": len(edgec_pass - tvm_pass),
        "with fallbacks": sum(1 for result in results.values() if result["edgec"].get("fallbacks")),
    }


def print_report(cases: list[Case], results: dict[str, dict]) -> None:
    by_category: dict[str, dict[str, dict]] = {}
    for case in cases:
        if case.name in results:
            by_category.setdefault(case.category, {})[case.name] = results[case.name]
    columns = ["cases", "edgec pass", "TVM pass", "TVM passes, edgec fails", "edgec passes, TVM fails", "with fallbacks"]
    print("| corpus | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for category, chunk in [*by_category.items(), ("all", results)]:
        counts = summarise(chunk)
        print(f"| {category} | " + " | ".join(str(counts[column]) for column in columns) + " |")
    regressions = [name for name, result in results.items() if result["tvm"]["passed"] and not result["edgec"]["passed"]]
    if regressions:
        print("\nTVM passes, edgec fails:")
        for name in regressions:
            print(f"  {name}: {results[name]['edgec']['reason']}")
    failures = [name for name, result in results.items() if not result["tvm"]["passed"] or not result["edgec"]["passed"]]
    if failures:
        print("\nfailures (edgec | plain TVM):")
        for name in failures:
            result = results[name]
            edgec_reason = "ok" if result["edgec"]["passed"] else result["edgec"]["reason"]
            tvm_reason = "ok" if result["tvm"]["passed"] else result["tvm"]["reason"]
            print(f"  {name}: {edgec_reason} | {tvm_reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (each in its own process)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case, both sides together")
    parser.add_argument("--limit", type=int, default=None, help="only the first N cases (after --only)")
    parser.add_argument("--only", action="append", default=[], help="only cases whose name contains this (repeatable)")
    parser.add_argument("--category", action="append", choices=CATEGORIES, help="only these corpora (repeatable)")
    parser.add_argument("--rtol", type=float, default=RTOL)
    parser.add_argument("--atol", type=float, default=ATOL)
    parser.add_argument("--json", type=Path, help="also write every case's result here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.rtol, args.atol)
        return 0
    cases = discover(categories=tuple(args.category or CATEGORIES))
    if args.only:
        cases = [case for case in cases if any(part in case.name for part in args.only)]
    cases = cases[: args.limit] if args.limit else cases
    results: dict[str, dict] = {}
    start = time.perf_counter()
    import queue

    workers: queue.Queue = queue.Queue()
    for _ in range(max(1, args.jobs)):
        workers.put(Worker(args.timeout, args.rtol, args.atol))

    def run_isolated(case: Case) -> dict:
        worker = workers.get()
        try:
            return worker.run(case)
        finally:
            workers.put(worker)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_isolated, case): case for case in cases}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            case = futures[future]
            results[case.name] = {"category": case.category, **future.result()}
            status = {True: "pass", False: "FAIL"}
            print(
                f"[{done}/{len(cases)}] {case.name}: edgec {status[results[case.name]['edgec']['passed']]}, "
                f"TVM {status[results[case.name]['tvm']['passed']]}",
                file=sys.stderr, flush=True,
            )
    while not workers.empty():
        workers.get().stop()
    results = {case.name: results[case.name] for case in cases}
    print(f"{len(cases)} cases in {time.perf_counter() - start:.0f} s, rtol {args.rtol:g}, atol {args.atol:g}\n")
    print_report(cases, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
