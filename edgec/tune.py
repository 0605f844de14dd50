"""``edgec tune``: MetaSchedule tuning of a model's kernels into a reusable database.

Tuning is opt-in and slow (minutes per kernel on two cores); its records are
applied by every later ``edgec compile`` for the same target whose kernels
match a tuned workload (same shapes and fused epilogue, any model), and the
schedule library covers the rest. Stages:

1. lower + graph + legalize/fuse  exactly the compile pipeline's prefix
   (+ int32 indices on aarch64)   (edgec/build.py kernel_passes), so tuned
                                  workloads are the kernels a compile sees
2. extract tasks                  one per distinct kernel, weighted by calls
3. baseline                       the schedule library's kernels, measured and
                                  recorded: a tuned schedule must beat them
4. tune                           MetaSchedule's evolutionary search on the
                                  kernels with the largest share of the run
                                  (calls x library latency), --trials in all,
                                  measured here (LocalRunner) or on a board
                                  (RPC tracker)
5. records                        JSON database under the target's directory,
                                  ~/.cache/edgec/tuning/<target>/ by default

Builder workers build with ``_build_candidate``: MetaSchedule's default
build imports ``tvm.s_tir.tensor_intrin`` in every new worker (a new pool per
batch), measured 53 s wall / 37 CPU-s here against 4 s for ``import tvm``,
which on two shared cores timed builds out. Workers still get 300 s
timeouts (MetaSchedule's 30 s default is short for a loaded machine).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from edgec.core.errors import TuningError
from edgec.core.model import Model
from edgec.targets import ResolvedTarget, linker, resolve
from edgec.tuning_db import default_database

log = logging.getLogger(__name__)

WORKER_TIMEOUT_S = 300.0
DEFAULT_TRIALS_PER_TASK = 32


def tuning_target(target: ResolvedTarget, threads: int):
    """The TVM target MetaSchedule tunes and compiles apply records for: with ``num-cores``."""
    import tvm

    if target.preset.kind != "llvm":
        raise TuningError(f"edgec tune supports CPU targets; {target.name} uses TVM's dlight GPU schedules")
    return tvm.target.Target({**target.tvm_json, "num-cores": threads})


def fused_module(model: Model, target: ResolvedTarget):
    """The compile pipeline up to the scheduling: the kernels MetaSchedule tunes and compile looks up."""
    import tvm

    from edgec.build import BuildOptions, kernel_passes
    from edgec.lower import to_relax

    with target.tvm_target():
        return tvm.transform.Sequential(kernel_passes(target, BuildOptions(schedules=True)))(to_relax(model.graph))


@dataclasses.dataclass
class TaskProgress:
    """Best measured latency per task, for the progress line."""

    names: list[str]
    weights: list[float]
    best_ms: dict[int, float] = dataclasses.field(default_factory=dict)
    trials: int = 0

    def total_ms(self) -> float | None:
        """Sum over tasks of calls x best latency: the tuned kernels' share of a run."""
        if len(self.best_ms) < len(self.names):
            return None
        return sum(self.weights[i] * ms for i, ms in self.best_ms.items())


@dataclasses.dataclass
class TuneResult:
    """``best_ms``: best measured latency per kernel (library baseline or tuned);
    ``tuned``: the kernels MetaSchedule searched; ``estimated_total_ms``: the
    kernels' best latencies weighted by calls."""

    database: Path
    tasks: int
    trials: int
    seconds: float
    best_ms: dict[str, float]
    estimated_total_ms: float | None
    tuned: list[str] = dataclasses.field(default_factory=list)


def _progress_callback(progress: TaskProgress, selected: list[int], report: Callable[[str], None]):
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            task_id = selected[task_id]  # MetaSchedule numbers the tasks it was given
            latencies = [
                sum(float(s) for s in result.run_secs) / len(result.run_secs) * 1e3
                for result in runner_results
                if result.error_msg is None and result.run_secs
            ]
            progress.trials += len(measure_candidates)
            if latencies:
                best = min(latencies)
                if best < progress.best_ms.get(task_id, float("inf")):
                    progress.best_ms[task_id] = best
            failed = len(runner_results) - len(latencies)
            total = progress.total_ms()
            best_text = f"{progress.best_ms[task_id]:.4g} ms" if task_id in progress.best_ms else "none yet"
            report(
                f"trial {progress.trials}: task {task_id + 1}/{len(progress.names)} {progress.names[task_id]}: "
                f"best {best_text}"
                + (f", {failed} failed" if failed else "")
                + (f"; all tasks' best, weighted by calls: {total:.4g} ms" if total is not None else "")
            )

    return _Progress()


def tune(
    model: Model,
    target: str | ResolvedTarget,
    *,
    trials: int,
    database: Path | None = None,
    threads: int | None = None,
    tracker: tuple[str, int] | None = None,
    key: str | None = None,
    trials_per_task: int | None = None,
    report: Callable[[str], None] = log.info,
) -> TuneResult:
    """Tune ``model``'s kernels for ``target`` with MetaSchedule; records go to ``database``.

    Measured on this machine (host targets), or on a board registered at an RPC
    ``tracker`` under ``key`` (ARM targets; the builder cross-compiles). ``threads``: the
    kernels' thread count (default: the physical cores), for the tuning target's
    ``num-cores`` and for the measuring workers' thread pool.
    """
    from tvm.s_tir import meta_schedule as ms

    from edgec.runtimes.local import configure_threads
    from edgec.targets.resolve import physical_cores

    resolved = resolve(target)
    threads = threads or physical_cores()
    tvm_target = tuning_target(resolved, threads)
    if tracker is None and not resolved.preset.host_runnable:
        raise TuningError(
            f"{resolved.name} code cannot run on this machine: tune it on the board with --tracker HOST:PORT --key KEY"
        )
    if trials < 1:
        raise TuningError("--trials must be at least 1")
    database = Path(database) if database else default_database(resolved)
    database.mkdir(parents=True, exist_ok=True)
    configure_threads(threads)  # MetaSchedule's LocalRunner workers inherit it
    started = time.monotonic()
    mod = fused_module(model, resolved)
    extracted = ms.relax_integration.extract_tasks(mod, tvm_target)
    if not extracted:
        raise TuningError("the model has no kernels to tune")
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted, work_dir=str(database / "logs"), num_threads=threads
    )
    names = [context.task_name for context in contexts]
    progress = TaskProgress(names, [float(w) for w in weights])
    builder = ms.builder.LocalBuilder(
        max_workers=2, timeout_sec=WORKER_TIMEOUT_S, f_build=_build_candidate, f_export=_exporter(resolved)
    )
    runner = _runner(tracker, key, threads)
    records = ms.database.JSONDatabase(work_dir=str(database), module_equality="structural")
    report(f"{len(contexts)} kernels; measuring {'at ' + key if tracker else 'on this machine'}")
    untraceable = _record_library_schedules(contexts, tvm_target, resolved, builder, runner, records, progress, report)
    per_task = trials_per_task or min(trials, DEFAULT_TRIALS_PER_TASK)
    tunable = [i for i in range(len(contexts)) if i not in untraceable]
    selected = _heaviest_first(progress, tunable)[: max(1, -(-trials // per_task))]
    if not selected:
        raise TuningError("no kernel of this model can be tuned: the schedule library's schedule of every one is kept")
    report(
        f"tuning the {len(selected)} kernel(s) with the largest share of the run, {per_task} trials each "
        f"({trials} in all): " + ", ".join(names[i] for i in selected)
    )
    ms.tune.tune_tasks(
        tasks=[contexts[i] for i in selected],
        task_weights=[weights[i] for i in selected],
        work_dir=str(database),
        max_trials_global=trials,
        max_trials_per_task=per_task,
        num_trials_per_iter=min(per_task, 64),
        builder=builder,
        runner=runner,
        database=records,
        cost_model=_cost_model(),
        measure_callbacks=[
            *ms.measure_callback.MeasureCallback.create("default"),
            _progress_callback(progress, selected, report),
        ],
    )
    seconds = time.monotonic() - started
    return TuneResult(
        database=database,
        tasks=len(contexts),
        trials=progress.trials,
        seconds=seconds,
        best_ms={names[i]: ms_ for i, ms_ in progress.best_ms.items()},
        estimated_total_ms=progress.total_ms(),
        tuned=[names[i] for i in selected],
    )


def _heaviest_first(progress: TaskProgress, tasks) -> list[int]:
    """Tasks by their share of a run (calls x measured library latency), largest first;
    unmeasured tasks last, in extraction order."""
    return sorted(tasks, key=lambda i: -(progress.weights[i] * progress.best_ms.get(i, 0.0)))


def replays(func, sch) -> bool:
    """Whether ``sch``'s trace, applied to ``func`` afresh, gives ``sch``'s module. A rule that
    rewrites a block outside the schedule's primitives (aarch64's folded additions,
    targets/schedules/fold_adds.py, ``ScheduleState.replace``) leaves a trace that does not:
    recorded, it fails to load (a JSON database replays every record) or replays to another
    schedule than the library's."""
    import tvm_ffi
    from tvm import s_tir

    fresh = s_tir.Schedule(func)
    try:
        sch.trace.apply_to_schedule(fresh, remove_postproc=False)
    except Exception:  # noqa: BLE001 - the trace does not apply: not replayable
        return False
    return tvm_ffi.structural_equal(fresh.mod, sch.mod)


def _record_library_schedules(contexts, tvm_target, target, builder, runner, database, progress, report) -> set[int]:
    """Measure the schedule library's schedule of every task and record it in ``database``.

    The search then has to beat it: compile applies a database's best record,
    so a kernel only leaves the library when MetaSchedule found something
    measured faster. Tasks whose workload already has records are skipped.
    Returns the tasks whose library schedule no record can hold (``replays``): they are
    not tuned, so that compile keeps the library's schedule for them.
    """
    import shutil
    import statistics

    from tvm.s_tir import meta_schedule as ms

    from edgec.targets.schedules import default_rules, first_schedule
    from edgec.targets.vector import cpu_vector

    rules = default_rules(cpu_vector(target))
    pending, untraceable = [], set()
    for index, context in enumerate(contexts):
        func = context.mod["main"]
        sch, _ = first_schedule(func, rules)
        if sch is not None and not replays(func, sch):
            untraceable.add(index)
            continue
        workload = database.commit_workload(context.mod)
        best = database.get_top_k(workload, 1)
        if best and best[0].run_secs:
            progress.best_ms[index] = statistics.fmean(float(t) for t in best[0].run_secs) * 1e3
            continue
        if sch is None:
            continue
        pending.append((index, workload, sch, ms.arg_info.ArgInfo.from_prim_func(func)))
    if untraceable:
        report(
            f"{len(untraceable)} kernel(s) keep the schedule library's schedule, not tuned: it rewrites blocks "
            "outside its trace (folded additions), which a tuning record cannot replay: "
            + ", ".join(progress.names[i] for i in sorted(untraceable))
        )
    if not pending:
        return untraceable
    report(f"measuring the schedule library's kernels first ({len(pending)} tasks): tuned records must beat them")
    built = builder.build([ms.builder.BuilderInput(item[2].mod, tvm_target) for item in pending])
    runnable = [(item, result) for item, result in zip(pending, built, strict=True) if result.error_msg is None]
    for item, result in zip(pending, built, strict=True):
        if result.error_msg is not None:
            report(f"library schedule of {progress.names[item[0]]} did not build: {result.error_msg.splitlines()[-1]}")
    inputs = [ms.runner.RunnerInput(result.artifact_path, "cpu", item[3]) for item, result in runnable]
    for ((index, workload, sch, args_info), built_result), future in zip(runnable, runner.run(inputs), strict=True):
        measured = future.result()
        shutil.rmtree(os.path.dirname(built_result.artifact_path), ignore_errors=True)
        if measured.error_msg is not None or not measured.run_secs:
            reason = (measured.error_msg or "no time measured").strip().splitlines()[-1]
            report(f"library schedule of {progress.names[index]} did not run: {reason}")
            continue
        run_secs = [float(t) for t in measured.run_secs]
        database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, run_secs, tvm_target, args_info))
        progress.best_ms[index] = statistics.fmean(run_secs) * 1e3
    total = progress.total_ms()
    weighted = f": all tasks' best, weighted by calls: {total:.4g} ms" if total is not None else ""
    report("schedule library measured" + weighted)
    return untraceable


def _cost_model() -> str:
    """XGBoost's cost model when xgboost is installed (not an edgec dependency), else random search."""
    import importlib.util

    if importlib.util.find_spec("xgboost") is not None:
        return "xgb"
    log.info("xgboost is not installed: MetaSchedule searches without a learned cost model")
    return "random"


def _build_candidate(mod, target, _params):
    """One candidate's build in a builder worker: MetaSchedule's ``default_build``
    (drop the weight-layout-rewrite blocks, ``tvm.build``) without its import of
    ``tvm.s_tir.tensor_intrin``, whose registrations only the search (in this
    process) uses: a tensorized candidate reaches the builder with its
    intrinsics' bodies already in its TIR."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _exporter(target: ResolvedTarget):
    """How builder workers write a candidate's shared library: the target's (cross) linker."""
    fcompile = linker(target.preset)
    if fcompile is None:
        return None  # MetaSchedule's default: the host's compiler

    def export(mod) -> str:
        import tempfile

        path = os.path.join(tempfile.mkdtemp(), "candidate.so")
        mod.export_library(path, fcompile=fcompile)
        return path

    return export


def _runner(tracker: tuple[str, int] | None, key: str | None, threads: int):
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False)
    if tracker is None:
        return ms.runner.LocalRunner(timeout_sec=WORKER_TIMEOUT_S, evaluator_config=evaluator)
    if not key:
        raise TuningError("--tracker needs --key: the device key the board registered with")
    host, port = tracker
    config = ms.runner.RPCConfig(
        tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=WORKER_TIMEOUT_S
    )
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)
