"""``edgec.compile``: an edgec Model -> an artifact directory.

The pipeline is one flat list of stages, in this order and for these reasons:

1. fold    constant subgraphs (ConstantOfShape, Reshape/Transpose/Cast/Mul of
           constants, Constant nodes) become initializers (edgec/core/fold.py):
           after the passes, which may leave some, and before lowering, so
           that TVM sees constant weights and the schedule rules match.
2. lower   ONNX IR -> Relax; unsupported ops are refused here, before any
           (slow) build starts; an importer failure names its node.
3. build   tvm.relax.build for the target (CUDA: dlight GPU schedules). A graph
           rewrite or schedule rule that fails falls back for its op or kernel
           (edgec/build.py); each fallback is recorded in the manifest.
4. export  lib.so linked by the target's (cross) compiler, model.onnx (its
           weights in model.onnx.data when over protobuf's 2 GiB), into a
           temporary directory next to the output.
5. verify  lib.so runs on a seeded random input, here (x86) or on an
           emulated board (ARM, qemu-user), against ONNX Runtime on the
           same graph or on its standard-ONNX equivalent (edgec ops), and
           PyTorch when the source was PyTorch (edgec/verify.py). When
           edgec's pipeline (graph rewrites, schedules) misses and TVM's own
           pipeline verifies, the build is redone with TVM's own pipeline and
           that is recorded as a fallback; a failure of both leaves no artifact.
6. commit  manifest.json written (with the sha256 of every file), the
           directory renamed into place.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec import __version__
from edgec.core.artifact import (
    GENERATOR,
    KERNEL_CONSTANTS,
    MANIFEST_FORMAT,
    MODEL_ONNX,
    REFERENCE_ONNX,
    Artifact,
    file_sha256,
    staging,
    write_manifest,
)
from edgec.core import onnx_files
from edgec.core.errors import VerificationError
from edgec.core.fallbacks import ALL_KERNELS, FallbackLog
from edgec.kernels import attach_onnx_nodes
from edgec.core.model import Model, input_signatures, value_signature
from edgec.core.progress import Progress
from edgec.core.stats import model_stats
from edgec.targets import ResolvedTarget, require_linker, resolve
from edgec.targets.schedules.winograd_graph import DEFAULT_POLICY, WinogradPolicy
from edgec.tuning_db import TuningReport
from edgec.verify import VerifyOptions
from edgec.verify import verify as _verify

log = logging.getLogger(__name__)


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
    winograd: WinogradPolicy | None = DEFAULT_POLICY,
    stack_buffers: bool = True,
) -> CompileResult:
    """Compile ``model`` for ``target`` into the artifact directory ``output``.

    ``schedules=False`` builds without edgec's CPU schedule library (TVM's
    naive default kernels); ``tuning_db`` names a MetaSchedule database
    (``edgec tune``) whose records are applied to the kernels they match.
    ``winograd``: which 3x3 convolutions become Winograd ones (a WinogradPolicy),
    None: all stay direct; ``stack_buffers=False`` keeps kernels' scratch buffers in TVM's
    workspace pool (see BuildOptions).
    """
    from edgec.build import BuildOptions, Stages
    from edgec.core.fold import fold_constants
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
        options = BuildOptions(schedules=schedules, tuning_db=Path(tuning_db) if tuning_db else None, winograd=winograd,
                               stack_buffers=stack_buffers)
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
        hashes = {name: file_sha256(directory / name) for name in built.files}
        manifest = build_manifest(model, resolved, built.files, hashes[MODEL_ONNX], verification, progress.seconds)
        manifest["constant_folding"] = {"nodes_folded": folded.nodes_before - folded.nodes_after, "by_op": folded.folded}
        manifest["kernels"] = built.kernels
        manifest["schedules"] = schedule_summary(resolved, options, built.kernels, built.tuning)
        manifest["schedules"]["fallbacks"] = fallbacks.as_list()
        manifest["sha256"] = hashes
        write_manifest(directory, manifest)
    artifact = Artifact(Path(output), manifest)
    return CompileResult(artifact, dict(progress.seconds))


@dataclasses.dataclass(frozen=True)
class _Built:
    kernels: list[dict[str, Any]]
    files: list[str]
    tuning: TuningReport | None


def _build_and_export(model: Model, mod, target: ResolvedTarget, options, directory: Path, progress: Progress,
                      fallbacks: FallbackLog) -> _Built:
    """The build and export stages: lib.so, model.onnx (and kernel constants) in ``directory``."""
    from edgec.build import build, export
    from edgec.runtimes.reference import has_custom_ops

    with progress.stage("build", f"tvm.relax.build for {target.spec}"):
        built = build(mod, target, options, fallbacks)
        attach_onnx_nodes(built.kernels, model.graph)
    with progress.stage("export", f"lib.so for {target.preset.cpu_arch}"):
        files = export(built.executable, target, directory)
        files += save_onnx(model.graph, directory / MODEL_ONNX)
        if model.standard_graph is not None and has_custom_ops(model.graph):  # what bench checks the device against
            files += save_onnx(model.standard_graph, directory / REFERENCE_ONNX)
        constants = directory / KERNEL_CONSTANTS
        constants.unlink(missing_ok=True)  # from a build this one replaced
        if built.kernel_constants:  # what `edgec profile` feeds kernels whose work depends on them
            np.savez(constants, **built.kernel_constants)
            files.append(KERNEL_CONSTANTS)
    return _Built(built.kernels, files, built.tuning)


def schedule_summary(target: ResolvedTarget, options, kernels: list[dict], tuning: TuningReport | None) -> dict[str, Any]:
    """Where the kernels' schedules came from: the library's rules, the tuning database, or none."""
    if target.preset.kind == "cuda":
        return {"library": "tvm-dlight", "tuning_db": None}
    by_rule: dict[str, int] = {}
    for rule in {call["kernel"]: call.get("schedule") for call in kernels}.values():
        by_rule[rule or "none"] = by_rule.get(rule or "none", 0) + 1
    return {
        "library": "edgec" if options.schedules else None,
        "by_rule": dict(sorted(by_rule.items())),
        "tuning_db": str(options.tuning_db) if options.tuning_db else None,
        "tuning_db_records": tuning.records if tuning else None,
        # kernels with a record in the database; of those, how many run MetaSchedule's schedule
        # (it measured faster) rather than the library's (recorded by edgec tune as the baseline)
        "tuning_db_matched": len(tuning.kernels) + len(tuning.library_best) if tuning else 0,
        "from_tuning_db": len(tuning.kernels) if tuning else 0,
    }


def save_onnx(graph: ir.Model, path: Path) -> list[str]:
    """Write ``graph`` to ``path`` (weights over protobuf's 2 GiB beside it, in ``path``.data);
    the names of the files written."""
    return [written.name for written in onnx_files.save(graph, path)]


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
        "generator": GENERATOR,
        "format": MANIFEST_FORMAT,
        "edgec_version": __version__,
        "tvm_version": tvm.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": {
            "path": str(model.source) if model.source else None,
            "format": model.source_format,
            "sha256": model.source_sha256,
        },
        "onnx": {"file": MODEL_ONNX, "sha256": onnx_sha256, "opset": opset},
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
        "inputs": input_signatures(graph),
        "outputs": [value_signature(value) for value in graph.graph.outputs],
        "passes": [report.as_dict() for report in model.pass_reports],
        "stats": model_stats(graph).as_dict(),
        "verification": verification,
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "files": files,
    }
