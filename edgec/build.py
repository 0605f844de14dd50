"""Relax IRModule -> built executable -> ``lib.so`` for the target's machine."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from edgec.errors import BuildError
from edgec.targets import ResolvedTarget, require_linker

log = logging.getLogger(__name__)


def relax_pipeline(target: ResolvedTarget, sink: dict):
    """TVM's default Relax pipeline for the target family, spelled out, in order:

    library dispatch -> legalize + fuse (CUDA: + dlight GPU schedules)
    -> capture the kernel table (names are final here) -> dataflow lowering
    -> memory planning and VM finalisation.
    """
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_family
    from tvm.relax.backend.cuda import pipeline as cuda_family

    from edgec.kernels import capture_pass

    tvm_target = target.tvm_target()
    family = cuda_family if target.preset.kind == "cuda" else cpu_family
    passes = [
        *family.library_dispatch_passes(tvm_target),
        *family.legalize_passes(tvm_target),
        capture_pass(sink),
        *family.dataflow_lower_passes(tvm_target),
        *family.finalize_passes(tvm_target),
    ]

    @tvm.transform.module_pass(opt_level=0, name="EdgecRelaxPipeline")
    def _pipeline(mod, _ctx):
        with tvm_target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def build(mod, target: ResolvedTarget):
    """``tvm.relax.build`` for ``target``; returns (executable, kernel calls in order)."""
    from tvm import relax

    from edgec.kernels import kernel_calls

    sink: dict = {}
    try:
        executable = relax.build(mod, target=target.tvm_target(), relax_pipeline=relax_pipeline(target, sink))
    except Exception as error:  # noqa: BLE001
        raise BuildError(f"TVM build for {target.spec} failed: {error}") from error
    return executable, kernel_calls(sink["mod"])


def export(executable, target: ResolvedTarget, directory: Path) -> list[str]:
    """Write ``lib.so`` (and, for CUDA, ``kernels.cu`` checked by nvcc); return file names."""
    from tvm.support import cc

    compiler = require_linker(target.preset)
    fcompile = cc.cross_compiler(compiler) if compiler else None
    lib = directory / "lib.so"
    try:
        if fcompile is None:
            executable.export_library(str(lib))
        else:
            executable.export_library(str(lib), fcompile=fcompile)
    except Exception as error:  # noqa: BLE001
        raise BuildError(f"linking lib.so for {target.spec} failed: {error}") from error
    files = ["lib.so"]
    if target.preset.kind == "cuda":
        files += _export_cuda_kernels(executable, target, directory)
    return files


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
    sources = device_sources(executable, "cuda")
    if not sources:
        raise BuildError(f"the {target.spec} build holds no CUDA module")
    source = directory / "kernels.cu"
    source.write_text("\n".join(sources))
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        log.warning("nvcc not found: CUDA kernels written to kernels.cu but not compiled")
        return ["kernels.cu"]
    arch = target.options["arch"]
    fatbin = directory / "kernels.fatbin"
    command = [nvcc, f"-arch={arch}", "--fatbin", "-w", "-o", str(fatbin), str(source)]
    log.info("checking CUDA kernels: %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"nvcc could not compile the generated CUDA kernels for {arch}:\n{done.stderr[-2000:]}")
    return ["kernels.cu", "kernels.fatbin"]
