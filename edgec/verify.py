"""Does the compiled lib.so compute what the model computes? (``edgec compile``'s verify stage)

lib.so runs on a seeded random input:

- host-runnable targets (x86): in this process;
- ARM targets: on an emulated board, edgec-agent under qemu-user (what
  ``edgec device emulate`` starts; the agent is built once per CPU and
  cached): the target's own machine code runs. Skipped, with the reason,
  only when qemu-user or the target's C library is not installed;
- CUDA: on GPU 0 when this machine has one (runtimes/cuda.py), else
  skipped with the reason.

Its outputs are compared (edgec.core.numerics.compare) with these references:

- ``onnxruntime``: ONNX Runtime on the compiled graph or, when that holds
  edgec ops, on its standard-ONNX equivalent (``model.standard_graph``, the
  passes run with ``pack=false``: masked dense weights, dequantized weights,
  Sign activations kept), which is saved as reference.onnx. It shares no
  code with edgec's kernels or with edgec's NumPy versions of its ops.
  Enforced -- except for a standard twin that binarises float values (Sign,
  a comparison): edgec's xnor/popcount ops sum exact integers, the twin's
  float Conv sums ``+-a`` terms in float32, and a Sign input within that
  rounding of 0 flips (edgec.runtimes.reference), so there the enforced
  check is
- ``float64``: reference.onnx evaluated in float64 by onnx's reference
  evaluator, which sums the binarised layers exactly as the ops define
  them; ONNX Runtime's float32 outputs are recorded, not enforced. A graph
  without edgec ops is float32 in the build as in ONNX Runtime: checked by
  ONNX Runtime as above.
- ``numpy``: onnx's ReferenceEvaluator with edgec's NumPy versions of its
  ops, for graphs with edgec ops. Enforced, but not independent.
- ``pytorch``: the source model, when it was PyTorch. Enforced unless a
  lossy pass changed the function (the other references carry the check).

int8 builds (a QDQ graph: QuantizeLinear/DequantizeLinear, from
``-p quantize-int8`` or quantized elsewhere): ONNX Runtime runs the QDQ
graph as written (graph optimisations off: the float arithmetic of the ONNX
operators, not ORT's fused integer kernels), and the allowed absolute error
is ``qdq_steps`` quantization steps of the output (edgec.core.numerics:
``(max - min) / 255`` of the reference output), or, if larger, 1.5 times how far
ONNX Runtime's own fused integer kernels are from the graph as written, on the
same input or the largest over ``INT8_INPUTS`` (4) seeded inputs, every one of
which the build must pass (``int8_tolerance``), or ``atol``. A
rounding boundary crossed one ulp apart moves an activation by one step and
that moves the output; a wrong kernel, scale or zero point moves it by
much more. Float builds keep their tolerances.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgec.core.artifact import REFERENCE_ONNX, Artifact
from edgec.core.errors import EmulatorError, VerificationError
from edgec.core.inputs import random_inputs
from edgec.core.model import Model, input_signatures, value_signature
from edgec.core.numerics import INT8_INPUTS, INT8_NOISE_FACTOR, compare, int8_spread, int8_tolerance, quantization_step
from edgec.core.progress import Progress
from edgec.runtimes.reference import Reference
from edgec.targets import ResolvedTarget

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VerifyOptions:
    """Tolerances of the post-build check: per output, pass when every
    |got - want| <= atol + rtol * max|want| (see edgec.core.numerics)."""

    enabled: bool = True
    rtol: float = 1e-4
    atol: float = 1e-4
    seed: int = 0
    threads: int | None = None  # kernel threads when the build runs in this process (None: the pool's default)
    qdq_steps: float = 1.0  # int8 (QDQ) builds: allowed error in quantization steps of the output


def references(model: Model, inputs: list[np.ndarray], rtol: float) -> tuple[list[Reference], str]:
    """Every reference that can run ``model`` on ``inputs`` (the module docstring; the rule shared with
    ``edgec bench`` is edgec.runtimes.reference.build_references), and why none could when the list is empty."""
    from edgec.runtimes import reference

    if reference.has_custom_ops(model.graph) and model.standard_graph is None:
        log.warning("the build is checked against edgec's NumPy references only: %s", standard_note(model))
    label = f"{REFERENCE_ONNX} (the standard-ONNX equivalent of the edgec ops)"
    found, unchecked = reference.build_references(model.graph, inputs, model.standard_graph, label)
    if model.torch_reference is not None:
        exact = all(
            report.max_abs_deviation is not None and report.max_rel_deviation <= rtol
            for report in model.pass_reports
            if report.modified
        )
        found.append(Reference("pytorch", model.torch_reference(*inputs), exact))
    return found, unchecked


def standard_note(model: Model) -> str:
    return model.standard_note or "no pass of edgec produced its edgec ops (no standard-ONNX equivalent is known)"


def verify(
    model: Model, target: ResolvedTarget, directory: Path, options: VerifyOptions, progress: Progress
) -> dict[str, Any]:
    """Run the build in ``directory`` and check it; the manifest's ``verification`` entry, or VerificationError."""
    if not options.enabled:
        return {"status": "skipped", "reason": "--no-verify"}

    floor = target.min_tolerance  # float16 builds: at least this (targets/resolve.py)
    options = dataclasses.replace(options, rtol=max(options.rtol, floor), atol=max(options.atol, floor))
    signature = {
        "target": {
            "preset": target.name, "spec": target.spec, "arch": target.preset.arch, "tvm": target.tvm_json,
            "cpu_arch": target.preset.cpu_arch, "host_runnable": target.preset.host_runnable,
        },
        "inputs": [value_signature(value) for value in model.graph.graph.inputs],
    }
    artifact = Artifact(directory, signature)
    runner = _runner(target, progress, options.threads)
    if isinstance(runner, str):
        return {"status": "skipped", "reason": runner}
    where = runner.where
    inputs = random_inputs(input_signatures(model.graph), options.seed)
    with progress.stage("verify", f"lib.so on {where} vs references"):
        got = runner.run(artifact, inputs)
        found, unchecked = references(model, inputs, options.rtol)
        if not found:
            return {"status": "skipped", "reason": unchecked}
        result: dict[str, Any] = {
            "status": "passed", "ran_on": where, "rtol": options.rtol, "atol": options.atol, "seed": options.seed,
            "rule": "per output: |got - want| <= atol + rtol * max|want|",
        }
        names = [value.name for value in model.graph.graph.outputs]
        # int8: the next seeds' runs and references, once for every quantized reference
        more = _more_int8_samples(model, artifact, runner, options) if any(r.quantized for r in found) else []
        for reference in found:
            if reference.quantized:
                agreement, entry = _check_int8(options, (got, reference), more, names)
            else:
                agreement, entry = compare(got, reference.outputs, rtol=options.rtol, atol=options.atol, names=names), {}
            entry = {**agreement.as_dict(), "enforced": reference.enforced, **entry}
            if reference.graph:
                entry["graph"] = reference.graph
            if reference.note:
                entry["note"] = reference.note
            result[reference.name] = entry
            if not agreement.ok and reference.enforced:
                hint = "Loosen --rtol/--atol if this is expected, or --no-verify to skip"
                if reference.quantized:
                    unit = max(entry["output_step"], 1e-30)  # the worst input's output quantization step
                    hint = (f"an int8 graph: {agreement.max_abs / unit:.1f} output quantization steps on seed "
                            f"{entry['worst_seed']}, {entry['atol'] / unit:.1f} allowed (--qdq-steps, or {INT8_NOISE_FACTOR:g} x "
                            "ORT's fused kernels' own distance from the graph as written when larger): "
                            "a kernel, scale or zero point is wrong, or raise --qdq-steps if this is expected, or --no-verify")
                raise VerificationError(
                    f"compiled outputs ({where}) differ from {reference.name}: {agreement.detail}; max abs error "
                    f"{agreement.max_abs:.3g}, max rel {agreement.max_rel:.3g}; no artifact was written. {hint}"
                )
        from edgec.core.model import has_custom_ops

        if has_custom_ops(model.graph) and model.standard_graph is None:
            result["independent_reference"] = f"none: {standard_note(model)}"
    return result


def _more_int8_samples(model: Model, artifact: Artifact, runner: Runner, options: VerifyOptions) -> list:
    """(seed, the build's outputs, {reference name: quantized Reference}) for the seeds after
    ``options.seed`` that compile's int8 rule also checks (``INT8_INPUTS`` in all)."""
    from edgec.runtimes.reference import build_references

    samples = []
    for seed in range(options.seed + 1, options.seed + INT8_INPUTS):
        inputs = random_inputs(input_signatures(model.graph), seed)
        found = build_references(model.graph, inputs, model.standard_graph)[0]
        samples.append((seed, runner.run(artifact, inputs), {ref.name: ref for ref in found if ref.quantized}))
    return samples


def _check_int8(options: VerifyOptions, first, more: list, names):
    """compile's int8 rule (edgec.core.numerics.int8_tolerance) on ``INT8_INPUTS`` seeded inputs: ``first``
    (the outputs and QDQ reference of seed ``options.seed``) and ``more`` (``_more_int8_samples``: the next
    seeds, each checked against its own run of the same reference). The noise, ORT fused vs as written in
    output steps, is the largest over them; every input must pass; the worst one is reported
    (agreement, manifest entry)."""
    name = first[1].name
    samples = [(options.seed, *first)]
    samples.extend((seed, outputs, refs[name]) for seed, outputs, refs in more if name in refs)
    noise = max(
        (int8_spread(ref.outputs, ref.fused) / step for _, _, ref in samples if (step := quantization_step(ref.outputs)) > 0),
        default=0.0,
    )
    worst = None
    for seed, outputs, ref in samples:
        allowed, step, spread = int8_tolerance(ref.outputs, ref.fused, options.qdq_steps, noise)
        atol = max(options.atol, allowed)
        agreement = compare(outputs, ref.outputs, rtol=options.rtol, atol=atol, names=names)
        rank = (not agreement.ok, agreement.max_abs / atol)
        if worst is None or rank > worst[0]:
            worst = (rank, seed, agreement, atol, step, spread)
    _, seed, agreement, atol, step, spread = worst
    rule = (f"int8, on {len(samples)} seeded inputs (seeds {options.seed}-{options.seed + len(samples) - 1}): atol = "
            f"max(--atol, {options.qdq_steps:g} x output step, {INT8_NOISE_FACTOR:g} x ORT fused vs as written, on that input "
            f"or the largest over the inputs, {noise:.1f} steps); the worst input is shown")  # fmt: skip
    entry = {"atol": atol, "rule": rule, "output_step": step, "ort_fused_spread": spread, "int8_noise_steps": noise,
             "inputs": len(samples), "worst_seed": seed}  # fmt: skip
    return agreement, entry


@dataclasses.dataclass(frozen=True)
class Runner:
    """Where the build runs (for the manifest and messages) and how: ``run(artifact, inputs) -> outputs``."""

    where: str
    run: Callable[[Artifact, list[np.ndarray]], list[np.ndarray]]


def _runner(target: ResolvedTarget, progress: Progress, threads: int | None) -> Runner | str:
    """How to run the target's code here, or the reason it cannot run here."""
    run_local = functools.partial(_run_local, threads=threads)
    preset = target.preset
    if preset.kind == "cuda":
        from edgec.runtimes.cuda import unavailable_reason

        reason = unavailable_reason(target.options["arch"])
        if reason is not None:
            return f"{reason}; check it on a GPU with edgec bench"
        return Runner("GPU 0 (CUDA)", run_local)
    if preset.host_runnable:
        from edgec.runtimes.device_functions import cpu_arch

        return Runner(f"this machine ({cpu_arch(platform.machine())})", run_local)
    cannot = f"{target.name} code cannot run on this machine; check it on the board with edgec bench"
    if preset.kind != "llvm":
        return cannot
    from edgec.runtimes.emulate import EMULATORS

    emulator = EMULATORS.get(preset.cpu_arch)
    if emulator is None or emulator.qemu is None:
        return cannot
    if shutil.which(emulator.qemu) is None:
        missing, package = emulator.qemu, "qemu-user-static"
    elif not Path(emulator.sysroot, "lib").is_dir():
        missing, package = f"the target's C library ({emulator.sysroot})", emulator.sysroot_package
    else:
        from edgec.runtimes.agent_build import build_agent

        agent = build_agent(target.name, progress=progress)  # cached after the first build (minutes)
        return Runner(
            f"emulated {target.name} ({emulator.qemu})", lambda artifact, inputs: _run_emulated(target, agent, artifact, inputs)
        )
    return (
        f"{target.name} code was not run: {missing} is not installed (sudo apt-get install {package} runs it "
        "on an emulated board); check it on the board with edgec bench"
    )


def _run_local(artifact: Artifact, inputs: list[np.ndarray], threads: int | None) -> list[np.ndarray]:
    from edgec.runtimes.local import LocalRunner

    return LocalRunner(artifact, threads).run(inputs)


def _run_emulated(target: ResolvedTarget, agent: Path, artifact: Artifact, inputs: list[np.ndarray]) -> list[np.ndarray]:
    from edgec.runtimes.bench import load_vm, run_once
    from edgec.runtimes.emulate import emulate
    from edgec.runtimes.session import connect

    try:
        board = emulate(target.name, agent=agent, timeout=120, count_instructions=False)  # qemu-user-static, no plugin
    except EmulatorError as error:  # not a VerificationError: rebuilding would not help
        raise EmulatorError(f"the emulated {target.name} board that verifies the build did not start: {error}; "
                            "--no-verify skips the check") from None
    with board, connect(rpc=board.address, timeout=120) as device:
        device.check_artifact(artifact)
        _module, vm = load_vm(device, artifact)
        return run_once(device, vm, inputs)
