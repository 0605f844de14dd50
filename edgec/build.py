"""Relax IRModule -> built executable -> ``lib.so`` for the target's machine."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgec.core.errors import BuildError
from edgec.core.fallbacks import ALL_KERNELS, FallbackLog, one_line
from edgec.targets import ResolvedTarget, linker
from edgec.targets.library_blob import packer
from edgec.targets.schedules.winograd_graph import DEFAULT_POLICY, WinogradPolicy
from edgec.tuning_db import TuningReport

log = logging.getLogger(__name__)

FORCE_SOURCE_ENV = "TVM_COMPILE_FORCE_FALLBACK"


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How kernels get their schedules.

    ``schedules``: edgec's CPU schedule library (targets/schedules) and its
    channels-last graph preparation; off = TVM's default Relax build, naive
    single-threaded loop nests. ``tuning_db``: a MetaSchedule database
    directory (edgec tune) whose records replace the library's schedule for
    the kernels they match. ``winograd``: with the schedule library, the 3x3 stride-1
    convolutions this policy picks become Winograd ones (targets/schedules/winograd_graph.py);
    None keeps them all direct. ``stack_buffers``: kernels' scratch buffers of 1-16 KiB (a
    register tile's accumulator) on the stack instead of TVM's workspace pool, which served
    them with an allocation and a free per parallel-loop iteration (edgec/stack_buffers.py).
    None of these changes CUDA builds (TVM's dlight).
    """

    schedules: bool = True
    tuning_db: Path | None = None
    winograd: WinogradPolicy | None = DEFAULT_POLICY
    stack_buffers: bool = True


@dataclasses.dataclass(frozen=True)
class Stages:
    """Which of edgec's own pipeline stages one build attempt runs (see ``build``)."""

    graph: bool  # the channels-last graph rewrites (targets/schedules/graph.py)
    schedules: bool  # the schedule library
    tuning_db: Path | None  # records of a tuning database
    winograd: WinogradPolicy | None = None  # Winograd convolutions (a graph rewrite whose kernels need the schedules)

    @classmethod
    def of(cls, target: ResolvedTarget, options: BuildOptions) -> Stages:
        cpu = target.preset.kind != "cuda"
        tuned = options.tuning_db if cpu else None
        winograd = options.winograd if cpu and options.schedules else None
        if winograd is not None:
            preset = target.preset
            winograd = winograd.for_target(preset.winograd_min_tiles, preset.winograd_tiles, preset.winograd_transform_cost)
        return cls(graph=cpu and (options.schedules or tuned is not None), schedules=cpu and options.schedules, tuning_db=tuned,
                   winograd=winograd)


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """What ``build`` hands the compiler.

    ``kernels``: the kernel calls of ``main`` in order (the manifest's kernel table; each
    records its ``"schedule"``, see ``build``); ``kernel_constants``: the integer constants
    kernels read, by the key their argument names (``kernel_constants.npz``);
    ``tuning``: what the tuning database gave, None when none was applied.
    """

    executable: Any
    kernels: list[dict[str, Any]]
    kernel_constants: dict[str, np.ndarray]
    tuning: TuningReport | None


@dataclasses.dataclass
class PipelineRecord:
    """What the passes of one pipeline run write down while TVM runs them (``relax_pipeline``):
    ``mod``, the IRModule captured after scheduling; ``schedules``, kernel -> rule name,
    ``"tuning-db"`` or None; ``tuning``, what the tuning database gave."""

    mod: Any = None
    schedules: dict[str, str | None] | None = None
    tuning: TuningReport | None = None


@dataclasses.dataclass
class Attempt:
    """What one build attempt keeps out: schedule rules that failed late, per kernel."""

    stages: Stages
    skip: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)


def relax_pipeline(
    target: ResolvedTarget,
    record: PipelineRecord,
    options: BuildOptions | None = None,
    fallbacks: FallbackLog | None = None,
    attempt: Attempt | None = None,
):
    """TVM's default Relax pipeline for the target family, spelled out, in order:

    library dispatch
    -> graph      CPU + schedules or tuning_db: BN as scale/shift, Clip as Relax ops, NHWC layout,
                  constants folded (targets/schedules/graph.py); before legalize
                  because kernels are written for the layout chosen here.
                  CUDA float16: convolutions and matmuls on float16 (float16_passes)
    -> legalize + fuse (CUDA: + dlight GPU schedules)
    -> narrow     aarch64 + schedules or tuning_db: kernels with int32 indices
                  (targets/schedules/__init__.py, narrow_indices), so the rules' loop-partition
                  hints survive; what tune extracts and tuning databases record
    -> tuned      CPU + tuning_db: kernels with a record in the database get its
                  best measured schedule (the library's own is measured and recorded
                  by edgec tune too, so a record wins only when it was faster)
    -> schedules  CPU + schedules: float32 exp/sigmoid/erf rewritten as polynomials that
                  vectorise (targets/schedules/fast_math.py), then the schedule library for
                  every kernel not yet scheduled; after fusion because a kernel's epilogue is part of it
    -> capture the kernel table (names are final here) -> dataflow lowering
    -> memory planning and VM finalisation.

    ``record`` receives the captured IRModule, the schedule of each kernel and what the
    tuning database gave (``PipelineRecord``). ``fallbacks`` receives what a rewrite or a rule could
    not handle; ``attempt`` (default: all of ``options``) says which stages run.
    """
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_family
    from tvm.relax.backend.cuda import pipeline as cuda_family

    from edgec.kernels import capture_pass

    options = options or BuildOptions()
    attempt = attempt or Attempt(Stages.of(target, options))
    fallbacks = fallbacks if fallbacks is not None else FallbackLog()
    stages = attempt.stages
    tvm_target = target.tvm_target()
    family = cpu_family if target.preset.kind != "cuda" else cuda_family
    tuned, scheduled = [], []
    if stages.schedules or stages.tuning_db is not None:
        from edgec.targets.schedules import apply_schedules, default_rules
        from edgec.targets.schedules.fast_math import fast_math
        from edgec.targets.vector import cpu_vector

        rules = default_rules(cpu_vector(target))
        record.schedules = {}
        if stages.schedules:  # exp/sigmoid/erf as vectorisable polynomials, then the rules
            scheduled = [fast_math(), apply_schedules(rules, record.schedules, fallbacks, attempt.skip)]
        if stages.tuning_db is not None:
            from edgec.tuning_db import apply_database_pass

            def keep(report: TuningReport) -> None:
                record.tuning = report

            tuned = [apply_database_pass(stages.tuning_db, rules, record.schedules, keep, attempt.skip)]
    passes = [
        *_kernel_passes(target, stages, fallbacks, family),
        *tuned,
        *scheduled,
        capture_pass(lambda mod: setattr(record, "mod", mod)),
        *family.dataflow_lower_passes(tvm_target),
        *family.finalize_passes(tvm_target),
    ]

    @tvm.transform.module_pass(opt_level=0, name="EdgecRelaxPipeline")
    def _pipeline(mod, _ctx):
        with tvm_target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def kernel_passes(target: ResolvedTarget, options: BuildOptions) -> list:
    """The pipeline up to the kernels the schedule rules and tuning databases see: library
    dispatch, the graph stage, legalize + fuse and (aarch64) int32 indices. ``edgec tune``
    extracts its tasks after these, so its records match what compile looks up."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_family

    return _kernel_passes(target, Stages.of(target, options), FallbackLog(), cpu_family)


def _kernel_passes(target: ResolvedTarget, stages: Stages, fallbacks: FallbackLog, family) -> list:
    tvm_target = target.tvm_target()
    narrow = []
    if stages.schedules or stages.tuning_db is not None:
        from edgec.targets.schedules import narrow_indices_pass, narrows_indices

        narrow = [narrow_indices_pass()] if narrows_indices(target.preset) else []
    return [
        *family.library_dispatch_passes(tvm_target),
        *_graph_stage(target, stages, fallbacks),
        *family.legalize_passes(tvm_target),
        *narrow,
    ]


def _graph_stage(target: ResolvedTarget, stages: Stages, fallbacks: FallbackLog) -> list:
    """The Relax passes between library dispatch and legalization: on CPUs with the
    schedule library or a tuning database, the channels-last graph the kernels are
    written (and tuned) for; for ``cuda:dtype=float16``, float16 convolutions and matmuls
    (float32 accumulation; weights cast once, at compile time); nothing otherwise."""
    if target.preset.kind == "cuda":
        return float16_passes() if target.dtype == "float16" else []
    return _graph_passes(target, fallbacks, stages.winograd) if stages.graph else []


def _graph_passes(target: ResolvedTarget, fallbacks: FallbackLog, winograd: WinogradPolicy | None) -> list:
    from edgec.ops.transposes import cancel_transposes
    from edgec.targets.schedules import graph_passes
    from edgec.targets.schedules.guard import guarded
    from edgec.targets.vector import cpu_vector

    # custom ops' NCHW<->NHWC wrappers cancel in the last one
    return [*graph_passes(cpu_vector(target), fallbacks, winograd), guarded(cancel_transposes(), "graph:cancel-transposes", fallbacks)]


# at most this many builds, each keeping out the schedules that broke the one before
MAX_ATTEMPTS = 6


def build(mod, target: ResolvedTarget, options: BuildOptions | None = None,
          fallbacks: FallbackLog | None = None) -> BuildResult:
    """``tvm.relax.build`` for ``target``: the executable, its kernel table and what it needs.

    On CPUs with the schedule library or a tuning database, each kernel call records
    ``"schedule"``: the library rule that scheduled it, ``"tuning-db"`` (a schedule
    MetaSchedule found that measured faster than the library's), ``"custom-op"`` (an
    edgec custom op's kernel, scheduled by its own lowering), or None (left as
    LegalizeOps wrote it).

    A schedule rule or graph rewrite never fails the build. Those that raise fall back
    for their kernel or op while the pipeline runs (see ``fallbacks``). A schedule that
    applies but breaks later (lowering, LLVM codegen) is found by compiling each
    scheduled kernel alone; the build is then retried without that schedule for that
    kernel. A failure no kernel explains is retried without the schedule library, then
    without edgec's graph rewrites too (TVM's own pipeline): each step is recorded as a
    fallback of kernel ``*``. Only a model TVM's own pipeline cannot build fails.
    ``fallbacks`` (optional) receives what fell back.
    """
    from tvm import relax

    from edgec.kernels import kernel_calls

    options = options or BuildOptions()
    fallbacks = fallbacks if fallbacks is not None else FallbackLog()
    attempt = Attempt(Stages.of(target, options))
    for _ in range(MAX_ATTEMPTS):
        record = PipelineRecord()
        try:
            pipeline = relax_pipeline(target, record, options, fallbacks, attempt)
            with _cuda_source_modules(target), _fast_tvmscript_import(target):
                executable = relax.build(mod.clone(), target=target.tvm_target(), relax_pipeline=pipeline,
                                         tir_pipeline=_tir_pipeline(target, options))
            break
        except Exception as error:  # noqa: BLE001 - find what broke it, keep it out, build again
            attempt = _next_attempt(attempt, error, target, record, fallbacks)
    else:  # pragma: no cover - every attempt keeps more out; the last is TVM's own pipeline
        raise BuildError(f"TVM build for {target.spec} failed {MAX_ATTEMPTS} times; see the fallbacks logged with -v")
    constants: dict[str, np.ndarray] = {}
    calls = kernel_calls(record.mod, constants)
    if record.schedules is not None:
        for call in calls:
            call["schedule"] = record.schedules.get(call["kernel"])
    failed_rules: dict[str, list[str]] = {}
    for fallback in fallbacks:
        failed_rules.setdefault(fallback.kernel, []).append(fallback.rule)
    for call in calls:
        if call["kernel"] in failed_rules:
            call["fallbacks"] = failed_rules[call["kernel"]]
    return BuildResult(executable, calls, constants, record.tuning)


def _tir_pipeline(target: ResolvedTarget, options: BuildOptions) -> str:
    """The name of the TIR pipeline ``relax.build`` runs: TVM's default, on CPUs followed by
    edgec's stack buffers (``BuildOptions.stack_buffers``)."""
    if target.preset.kind == "cuda" or not options.stack_buffers:
        return "default"
    from edgec.stack_buffers import tir_pipeline

    return tir_pipeline()


def _next_attempt(attempt: Attempt, error: Exception, target: ResolvedTarget, record: PipelineRecord,
                  fallbacks: FallbackLog) -> Attempt:
    """The attempt after ``attempt`` failed with ``error``: the same without the schedules
    that do not compile alone, else one stage less; BuildError when nothing is left."""
    stages = attempt.stages
    broken = failing_kernels(record.mod, target, record.schedules or {}) if record.mod is not None else {}
    skip = dict(attempt.skip)
    for kernel, (rule, reason) in broken.items():
        if rule in skip.get(kernel, frozenset()):
            continue
        skip[kernel] = skip.get(kernel, frozenset()) | {rule}
        fallbacks.add(kernel, rule, f"the scheduled kernel does not compile: {reason}", "rebuilding it without this schedule")
    if skip != attempt.skip:
        return Attempt(stages, skip)
    if stages.schedules or stages.tuning_db is not None:
        fallbacks.add(ALL_KERNELS, "schedules", error, "rebuilding with TVM's default kernels")
        return Attempt(Stages(graph=stages.graph, schedules=False, tuning_db=None))
    if stages.graph:
        fallbacks.add(ALL_KERNELS, "graph", error, "rebuilding with TVM's own pipeline")
        return Attempt(Stages(graph=False, schedules=False, tuning_db=None))
    raise BuildError(f"TVM build for {target.spec} failed: {one_line(error)}") from error


def failing_kernels(mod, target: ResolvedTarget, schedules: dict[str, str | None]) -> dict[str, tuple[str, str]]:
    """Kernels of ``mod`` scheduled by edgec (a library rule or the tuning database) that
    do not compile on their own for ``target``: kernel -> (schedule, one-line error)."""
    import tvm
    from tvm import tirx

    broken = {}
    for gvar, func in mod.functions_items():
        rule = schedules.get(gvar.name_hint)
        if not isinstance(func, tirx.PrimFunc) or rule is None or rule == "custom-op":
            continue
        try:
            tvm.tirx.build(tvm.IRModule({gvar: func.with_attr("global_symbol", gvar.name_hint)}), target=target.tvm_target())
        except Exception as error:  # noqa: BLE001 - this kernel is one that breaks the build
            broken[gvar.name_hint] = (rule, one_line(error))
    return broken


def float16_passes() -> list:
    """Convolutions and matmuls on float16 operands, accumulated in float32; element-wise ops,
    BN and the graph's inputs and outputs stay float32 (TVM's ToMixedPrecision)."""
    from tvm import relax

    return [
        relax.transform.ConvertToDataflow(),  # ToMixedPrecision rewrites dataflow blocks only
        relax.transform.ToMixedPrecision(out_dtype="float32"),
        relax.transform.FoldConstant(),  # the weights' float16 casts, done here rather than on every run
    ]


@contextlib.contextmanager
def _fast_tvmscript_import(target: ResolvedTarget) -> Iterator[None]:
    """For float16 CUDA builds, speed up the import of TVM's tensor-core intrinsics, which
    dlight's Matmul rule imports when it tensorizes a float16 kernel.

    They are TVMScript, parsed at import; the parser calls ``inspect.stack()`` for each of
    its ~250 functions, and ``inspect.getmodule`` scans all of ``sys.modules`` for every
    frame whose file is not a real one (``<frozen importlib._bootstrap>``): the import took
    175 s here in a process with TVM alone and 369 s with torch loaded (ResNet-18 float16:
    256 s of build). With getmodule's answer for such pseudo-files kept during the build
    (None: no module lives in them) it took 13 s (ResNet-18: 32 s of build).
    """
    if target.preset.kind != "cuda" or target.dtype != "float16" or "tvm.s_tir.tensor_intrin.cuda" in sys.modules:
        yield
        return
    import inspect

    original = inspect.getmodule
    pseudo_files: dict[str, object] = {}

    def getmodule(obj, _filename=None):
        if isinstance(_filename, str) and _filename.startswith("<"):
            if _filename not in pseudo_files:
                pseudo_files[_filename] = original(obj, _filename)
            return pseudo_files[_filename]
        return original(obj, _filename)

    inspect.getmodule = getmodule
    try:
        yield
    finally:
        inspect.getmodule = original


@contextlib.contextmanager
def _cuda_source_modules(target: ResolvedTarget) -> Iterator[None]:
    """CUDA builds keep their kernels as CUDA source inside lib.so, even where TVM's CUDA
    runtime is loaded (which would otherwise compile them now, with NVRTC, for the arch
    named in the target only): the same lib.so comes out with or without a GPU, and
    loading it compiles or fetches the kernels for the GPU at hand (runtimes/cuda.py).
    ``TVM_COMPILE_FORCE_FALLBACK`` is TVM's switch for this (read when each CUDA module is
    created); it is set for the build only."""
    if target.preset.kind != "cuda":
        yield
        return
    before = os.environ.get(FORCE_SOURCE_ENV)
    os.environ[FORCE_SOURCE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FORCE_SOURCE_ENV, None)
        else:
            os.environ[FORCE_SOURCE_ENV] = before


def export(executable, target: ResolvedTarget, directory: Path) -> list[str]:
    """Write ``lib.so`` (and, for CUDA, ``kernels.cu`` checked by nvcc); return file names. On CPU
    targets the executable and its weights are linked in from a file (targets/library_blob.py)."""
    options = {}
    if (fcompile := linker(target.preset)) is not None:
        options["fcompile"] = fcompile
    if target.preset.kind != "cuda" and (pack := packer(target.preset.cpu_arch)) is not None:
        options["fpack_imports"] = pack
    lib = directory / "lib.so"
    try:
        executable.export_library(str(lib), **options)
    except Exception as error:  # noqa: BLE001
        raise BuildError(f"linking lib.so for {target.spec} failed: {_linker_message(error)}") from error
    files = ["lib.so"]
    if target.preset.kind == "cuda":
        files += _export_cuda_kernels(executable, target, directory)
    return files


def _linker_message(error: Exception) -> str:
    """The linker's diagnostics first, each once (TVM's message starts with "Compilation error:" and
    ends with the command line, which then reads as the failure in a one-line summary)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    command = [line for line in lines if line.startswith("Command line:")]
    seen = dict.fromkeys(line for line in lines if line != "Compilation error:" and not line.startswith("Command line:"))
    return "; ".join([*seen, *command]) or str(error)


def device_sources(executable, kind: str) -> list[str]:
    """Source code of the device modules of ``kind`` (e.g. ``"cuda"``) inside an executable."""
    found = []
    pending = list(executable.mod.imports)
    while pending:
        module = pending.pop()
        if module.kind == kind:
            found.append(module.inspect_source())
        pending.extend(module.imports)
    return found


def _export_cuda_kernels(executable, target: ResolvedTarget, directory: Path) -> list[str]:
    """kernels.cu (the CUDA source inside lib.so) and, where nvcc is installed, kernels.fatbin:
    compiled the way TVM compiles CUDA with nvcc, for the target's arch, with its PTX kept so
    that newer GPUs run it too. ``edgec run/bench/profile`` load this fatbin instead of
    compiling the source again on the GPU machine (runtimes/cuda.py)."""
    sources = device_sources(executable, "cuda")
    if not sources:
        raise BuildError(f"the {target.spec} build holds no CUDA module")
    source = directory / "kernels.cu"
    source.write_text("\n".join(sources))
    if shutil.which("nvcc") is None:
        log.warning("nvcc not found: CUDA kernels written to kernels.cu but not compiled")
        return ["kernels.cu"]
    from tvm.support import nvcc

    arch = target.options["arch"]
    number = arch.removeprefix("sm_")
    gencode = ["-gencode", f"arch=compute_{number},code=sm_{number}", "-gencode", f"arch=compute_{number},code=compute_{number}"]
    log.info("checking CUDA kernels: nvcc --fatbin %s", " ".join(gencode))
    try:
        with target.tvm_target():  # TVM's nvcc driver reads the arch's major version from the current target
            nvcc.compile_cuda(source.read_text(), target_format="fatbin", arch=gencode, compiler="nvcc", path_target=str(directory / "kernels.fatbin"))
    except RuntimeError as error:
        detail = str(error).rpartition("Compilation error:")[2].strip()  # TVM puts the whole source first
        raise BuildError(f"nvcc could not compile the generated CUDA kernels for {arch}:\n{detail[-2000:]}") from None
    return ["kernels.cu", "kernels.fatbin"]
