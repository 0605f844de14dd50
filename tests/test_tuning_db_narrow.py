"""On aarch64 and x86 compile, tuning databases and ``edgec tune`` see the same int32-index kernels.

The pipeline narrows every kernel to int32 indices right after legalize on aarch64 and x86
(``schedules.narrow_indices_pass``: TVM's own narrowing drops the loop-partition hints),
before the tuning database and the rules. So ``edgec tune`` extracts, records and times
the int32 form, and a database's record of the library's own schedule builds that same
form in compile. Checked here without a board: the records are written directly, and the
tuner's builder is a recorder.
"""

from __future__ import annotations

import types

import pytest

import edgec
from edgec.build import BuildOptions, PipelineRecord, relax_pipeline
from edgec.lower import to_relax
from edgec.targets import resolve
from edgec.targets.schedules import default_rules, first_schedule, narrows_indices
from edgec.targets.vector import cpu_vector
from edgec.tune import TaskProgress, _record_library_schedules, fused_module, replays, tuning_target


def _loop_dtypes(func) -> set[str]:
    import tvm_ffi
    from tvm import tirx

    found: set[str] = set()
    tvm_ffi.structural_walk(func.body, [(tirx.For, lambda loop: found.add(str(loop.loop_var.ty)))], order="post")
    return found


@pytest.fixture(scope="module")
def a53_tasks(saved_models):
    from tvm.s_tir import meta_schedule as ms

    target = resolve("cortex-a53")
    model = edgec.load(saved_models["mobilenet"].files["onnx"])
    tvm_target = tuning_target(target, 1)
    tasks = ms.relax_integration.extract_tasks(fused_module(model, target), tvm_target)
    return target, model, tvm_target, tasks


def test_aarch64_and_x86_narrow_armv7_and_cuda_do_not():
    assert narrows_indices(resolve("cortex-a53").preset) and narrows_indices(resolve("x86").preset)
    assert not narrows_indices(resolve("cortex-a7").preset)
    assert not narrows_indices(resolve("cuda").preset)


def test_tune_extracts_the_int32_kernels(a53_tasks, saved_models):
    from tvm.s_tir import meta_schedule as ms

    _, model, _, tasks = a53_tasks
    assert tasks and all(_loop_dtypes(task.dispatched[0]["main"]) <= {"int32"} for task in tasks)
    a7 = resolve("cortex-a7")  # armv7: the kernels keep TVM's int64 form until its own TIR pipeline
    a7_tasks = ms.relax_integration.extract_tasks(fused_module(model, a7), tuning_target(a7, 1))
    assert any("int64" in _loop_dtypes(task.dispatched[0]["main"]) for task in a7_tasks)


def test_library_records_build_the_int32_form(a53_tasks, tmp_path):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    target, model, tvm_target, tasks = a53_tasks
    rules = default_rules(cpu_vector(target))
    database = ms.database.JSONDatabase(work_dir=str(tmp_path), module_equality="structural")
    recorded = 0
    for task in tasks:
        func = task.dispatched[0]["main"]
        sch, _ = first_schedule(func, rules)
        if sch is None or not replays(func, sch):  # as tune does: folded additions are not in the trace
            continue
        workload = database.commit_workload(task.dispatched[0])
        args = ms.arg_info.ArgInfo.from_prim_func(func)
        database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [1e-3], tvm_target, args))
        recorded += 1
    assert recorded >= 3

    record = PipelineRecord()
    pipeline = relax_pipeline(target, record, BuildOptions(tuning_db=tmp_path))
    with tvm.target.Target(target.tvm_json):
        pipeline(to_relax(model.graph))
    assert record.tuning is not None and len(record.tuning.library_best) >= 3
    assert not record.tuning.kernels  # every record is the library's own schedule
    depthwise = [name for name, rule in record.schedules.items() if rule and "depthwise" in rule]
    assert depthwise, record.schedules
    for name in record.tuning.library_best:
        assert _loop_dtypes(record.mod[name]) == {"int32"}, name


def test_tune_measures_the_library_schedule_compile_builds(a53_tasks):
    """Before the search, tune builds (to time) the schedule library's schedule of each extracted
    kernel: the very module compile builds for it. A build that fails is reported, not raised."""
    import tvm_ffi

    target, _, tvm_target, tasks = a53_tasks
    rules = default_rules(cpu_vector(target))

    class RecordingBuilder:
        inputs: list = []

        def build(self, inputs):
            self.inputs = list(inputs)
            return [types.SimpleNamespace(error_msg="not built here", artifact_path=None) for _ in inputs]

    class NoRunner:
        def run(self, inputs):
            assert not inputs  # nothing was built
            return []

    from tvm.s_tir import meta_schedule as ms

    contexts = [types.SimpleNamespace(mod=task.dispatched[0]) for task in tasks]
    progress = TaskProgress([task.task_name for task in tasks], [1.0] * len(tasks))
    builder, said = RecordingBuilder(), []
    database = ms.database.MemoryDatabase()
    _record_library_schedules(contexts, tvm_target, target, builder, NoRunner(), database, progress, said.append)
    scheduled = [(task, first_schedule(task.dispatched[0]["main"], rules)[0]) for task in tasks]
    library = [sch.mod for task, sch in scheduled if sch is not None and replays(task.dispatched[0]["main"], sch)]
    untraceable = [task.task_name for task, sch in scheduled if sch is not None and not replays(task.dispatched[0]["main"], sch)]
    assert len(builder.inputs) == len(library) >= 3
    assert untraceable and all(name in said[0] for name in untraceable)  # the residual 1x1s: bias and shortcut folded
    for item, expected in zip(builder.inputs, library, strict=True):
        assert _loop_dtypes(item.mod["main"]) == {"int32"}
        assert tvm_ffi.structural_equal(item.mod, expected)
    assert sum("did not build" in line for line in said) == len(library)
