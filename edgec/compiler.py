"""``edgec.compile``: an edgec Model -> an artifact directory.

The pipeline is one flat list of stages, in this order and for these reasons:

1. fold    constant subgraphs (ConstantOfShape, Reshape/Transpose/Cast/Mul of
           constants, Constant nodes) become initializers (edgec/fold.py):
           after the passes, which may leave some, and before lowering, so
           that TVM sees constant weights and the schedule rules match.
2. lower   ONNX IR -> Relax; unsupported ops are refused here, before any
           (slow) build starts; an importer failure names its node.
3. build   tvm.relax.build for the target (CUDA: dlight GPU schedules). A graph
           rewrite or schedule rule that fails falls back for its op or kernel
           (edgec/build.py); each fallback is recorded in the manifest.
4. export  lib.so linked by the target's (cross) compiler, model.onnx,
           into a temporary directory next to the output.
5. verify  host-runnable targets run lib.so on a seeded random input
           against ONNX Runtime on the same ONNX (and PyTorch when the
           source was PyTorch). When edgec's pipeline (graph rewrites,
           schedules) misses and TVM's own pipeline verifies, the build is
           redone with TVM's own pipeline and that is recorded as a fallback;
           a failure of both leaves no artifact.
6. commit  manifest.json written, the directory renamed into place.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec import __version__
from edgec.numerics import deviation
from edgec.artifact import KERNEL_CONSTANTS, Artifact, staging, write_manifest
from edgec.errors import VerificationError
from edgec.fallbacks import ALL_KERNELS, FallbackLog, one_line
from edgec.kernels import attach_onnx_nodes
from edgec.model import Model, value_signature
from edgec.progress import Progress
from edgec.stats import model_stats
from edgec.targets import ResolvedTarget, require_linker, resolve

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VerifyOptions:
    """Tolerances of the post-build check: pass when |got - want| <= atol + rtol * |want|."""

    enabled: bool = True
    rtol: float = 1e-4
    atol: float = 1e-4
    seed: int = 0


@dataclasses.dataclass
class CompileResult:
    artifact: Artifact
    seconds: dict[str, float]

    @property
    def manifest(self) -> dict[str, Any]:
        return self.artifact.manifest


def compile(  # noqa: A001 - the public name users expect: edgec.compile
    model: Model,
    target: str | ResolvedTarget,
    output: str | Path,
    *,
    verify: VerifyOptions | bool = True,
    progress: Progress | None = None,
    schedules: bool = True,
    tuning_db: str | Path | None = None,
) -> CompileResult:
    """Compile ``model`` for ``target`` into the artifact directory ``output``.

    ``schedules=False`` builds without edgec's CPU schedule library (TVM's
    naive default kernels); ``tuning_db`` names a MetaSchedule database
    (``edgec tune``) whose records are applied to the kernels they match.
    """
    from edgec.build import BuildOptions, Stages
    from edgec.fold import fold_constants
    from edgec.lower import to_relax

    progress = progress or Progress()
    if isinstance(verify, bool):
        verify = VerifyOptions(enabled=verify)
    resolved = resolve(target)
    require_linker(resolved.preset)  # a missing cross compiler fails before the build, not after
    with staging(output) as directory:
        with progress.stage("fold", "constant subgraphs -> initializers"):
            folded = fold_constants(model.graph)
        with progress.stage("lower", "ONNX -> TVM Relax"):
            mod = to_relax(model.graph, resolved)
        options = BuildOptions(schedules=schedules, tuning_db=Path(tuning_db) if tuning_db else None)
        fallbacks = FallbackLog()
        built = _build_and_export(model, mod, resolved, options, directory, progress, fallbacks)
        try:
            verification = _verify(model, resolved, directory, verify, progress)
        except VerificationError as error:
            stages = Stages.of(resolved, options)
            if not (stages.graph or stages.schedules or stages.tuning_db):
                raise
            log.warning("%s; building again with TVM's own pipeline", error)
            fallbacks.add(ALL_KERNELS, "verification", error, "rebuilt with TVM's own pipeline")
            options = BuildOptions(schedules=False, tuning_db=None)
            built = _build_and_export(model, mod, resolved, options, directory, progress, fallbacks)
            verification = _verify(model, resolved, directory, verify, progress)
        manifest = build_manifest(model, resolved, built.files, built.onnx_sha256, verification, progress.seconds)
        manifest["constant_folding"] = {"nodes_folded": folded.nodes_before - folded.nodes_after, "by_op": folded.folded}
        manifest["kernels"] = built.kernels
        manifest["schedules"] = schedule_summary(resolved, options, built.kernels, built.sink)
        manifest["schedules"]["fallbacks"] = fallbacks.as_list()
        write_manifest(directory, manifest)
    artifact = Artifact(Path(output), manifest)
    return CompileResult(artifact, dict(progress.seconds))


@dataclasses.dataclass
class _Built:
    kernels: list[dict[str, Any]]
    files: list[str]
    onnx_sha256: str
    sink: dict[str, Any]


def _build_and_export(model: Model, mod, target: ResolvedTarget, options, directory: Path, progress: Progress,
                      fallbacks: FallbackLog) -> _Built:
    """The build and export stages: lib.so, model.onnx (and kernel constants) in ``directory``."""
    from edgec.build import build, export

    sink: dict[str, Any] = {}
    with progress.stage("build", f"tvm.relax.build for {target.spec}"):
        executable, kernels = build(mod, target, options, sink, fallbacks)
        attach_onnx_nodes(kernels, model.graph)
    with progress.stage("export", f"lib.so for {target.preset.cpu_arch}"):
        files = export(executable, target, directory)
        onnx_sha256 = save_onnx(model.graph, directory / "model.onnx")
        files.append("model.onnx")
        constants = directory / KERNEL_CONSTANTS
        constants.unlink(missing_ok=True)  # from a build this one replaced
        if sink.get("kernel_constants"):  # what `edgec profile` feeds kernels whose work depends on them
            np.savez(constants, **sink["kernel_constants"])
            files.append(KERNEL_CONSTANTS)
    return _Built(kernels, files, onnx_sha256, sink)


def schedule_summary(target: ResolvedTarget, options, kernels: list[dict], sink: dict) -> dict[str, Any]:
    """Where the kernels' schedules came from: the library's rules, the tuning database, or none."""
    if target.preset.kind == "cuda":
        return {"library": "tvm-dlight", "tuning_db": None}
    by_rule: dict[str, int] = {}
    for rule in {call["kernel"]: call.get("schedule") for call in kernels}.values():
        by_rule[rule or "none"] = by_rule.get(rule or "none", 0) + 1
    tuning = sink.get("tuning", {})
    return {
        "library": "edgec" if options.schedules else None,
        "by_rule": dict(sorted(by_rule.items())),
        "tuning_db": str(options.tuning_db) if options.tuning_db else None,
        "tuning_db_records": tuning.get("records"),
        # kernels with a record in the database; of those, how many run MetaSchedule's schedule
        # (it measured faster) rather than the library's (recorded by edgec tune as the baseline)
        "tuning_db_matched": len(tuning.get("kernels", ())) + len(tuning.get("library_best", ())),
        "from_tuning_db": len(tuning.get("kernels", ())),
    }


def save_onnx(graph: ir.Model, path: Path) -> str:
    ir.save(graph, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verify(
    model: Model, target: ResolvedTarget, directory: Path, options: VerifyOptions, progress: Progress
) -> dict[str, Any]:
    if not options.enabled:
        return {"status": "skipped", "reason": "--no-verify"}
    if target.preset.kind == "cuda":
        from edgec.runtimes.cuda import unavailable_reason

        reason = unavailable_reason(target.options["arch"])
        if reason is not None:
            return {"status": "skipped", "reason": f"{reason}; check it on a GPU with edgec bench"}
    elif not target.preset.host_runnable:
        return {
            "status": "skipped",
            "reason": f"{target.name} code cannot run on this machine; check it on the board with edgec bench",
        }
    floor = target.min_tolerance  # float16 builds: at least this (targets/resolve.py)
    options = dataclasses.replace(options, rtol=max(options.rtol, floor), atol=max(options.atol, floor))
    from edgec.artifact import Artifact as _Artifact
    from edgec.frontend import input_arrays
    from edgec.runtimes.local import LocalRunner

    with progress.stage("verify", "lib.so vs ONNX Runtime" + (" and PyTorch" if model.torch_reference else "")):
        inputs = input_arrays(model, options.seed)
        signature = {
            "target": {"preset": target.name, "arch": target.preset.arch, "tvm": target.tvm_json, "host_runnable": True},
            "inputs": [value_signature(value) for value in model.graph.graph.inputs],
        }
        got = LocalRunner(_Artifact(directory, signature)).run(inputs)
        result: dict[str, Any] = {"status": "passed", "rtol": options.rtol, "atol": options.atol, "seed": options.seed}
        checks = []
        reference, name = _reference(model, inputs)
        if reference is not None:
            checks.append((name, reference, True))
        else:
            unchecked = name
        if model.torch_reference is not None:
            exact_passes = all(
                report.max_abs_deviation is not None and report.max_rel_deviation <= options.rtol
                for report in model.pass_reports
                if report.modified
            )
            checks.append(("pytorch", model.torch_reference(*inputs), exact_passes))
        for name, want, enforced in checks:
            max_abs, max_rel = deviation(got, want)
            close = all(
                # NaN where the reference has NaN (a log of a negative input) is a match
                g.shape == w.shape and np.allclose(g, w, rtol=options.rtol, atol=options.atol, equal_nan=True)
                for g, w in zip(got, want, strict=True)
            )
            result[name] = {"max_abs": max_abs, "max_rel": max_rel, "within_tolerance": close, "enforced": enforced}
            if not close and enforced:
                raise VerificationError(
                    f"compiled outputs differ from {name}: max abs error {max_abs:.3g}, max rel {max_rel:.3g} "
                    f"(tolerance rtol={options.rtol:g}, atol={options.atol:g}); no artifact was written. "
                    "Loosen --rtol/--atol if this is expected, or --no-verify to skip"
                )
        if not checks:
            result = {"status": "skipped", "reason": unchecked}
    return result


def _reference(model: Model, inputs: list[np.ndarray]) -> tuple[list[np.ndarray] | None, str]:
    """(outputs, name) of the reference run on ``inputs``: ONNX Runtime, else onnx's reference
    evaluator ("numpy": custom ops, and graphs ONNX Runtime refuses, such as opsets before 7,
    "Could not find an implementation for AveragePool(1)"); (None, why) when neither runs it."""
    from edgec.runtimes.reference import has_custom_ops, reference_outputs, run_numpy_reference

    try:
        outputs = reference_outputs(model.graph, inputs)
        if outputs is None:
            return None, "no reference can run this graph (custom ops)"
        return outputs, "numpy" if has_custom_ops(model.graph) else "onnxruntime"
    except Exception as error:  # noqa: BLE001 - onnxruntime refuses the graph: try onnx's own evaluator
        ort_error = one_line(error)
    log.info("ONNX Runtime cannot run this graph (%s); checking against onnx's reference evaluator", ort_error)
    try:
        return run_numpy_reference(model.graph, inputs), "numpy"
    except Exception as error:  # noqa: BLE001 - no reference runs this graph
        reason = f"no reference runs this graph (ONNX Runtime: {ort_error}; onnx reference: {one_line(error)})"
        log.warning("verification skipped: %s", reason)
        return None, reason


def build_manifest(
    model: Model,
    target: ResolvedTarget,
    files: list[str],
    onnx_sha256: str,
    verification: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, Any]:
    import tvm

    graph = model.graph
    opset = graph.opset_imports.get("", None)
    return {
        "format": 1,
        "edgec_version": __version__,
        "tvm_version": tvm.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": {
            "path": str(model.source) if model.source else None,
            "format": model.source_format,
            "sha256": model.source_sha256,
        },
        "onnx": {"file": "model.onnx", "sha256": onnx_sha256, "opset": opset},
        "target": {
            "preset": target.name,
            "spec": target.spec,
            "arch": target.preset.arch,
            "cpu_arch": target.preset.cpu_arch,
            "tvm": target.tvm_json,
            "host": target.host_json,
            "host_runnable": target.preset.host_runnable,
            "dtype": target.dtype,
            "min_tolerance": target.min_tolerance,
        },
        "inputs": [value_signature(value) for value in graph.graph.inputs],
        "outputs": [value_signature(value) for value in graph.graph.outputs],
        "passes": [report.as_dict() for report in model.pass_reports],
        "stats": model_stats(graph).as_dict(),
        "verification": verification,
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "files": files,
    }
