"""``edgec bench``: time a compiled artifact end to end on a device.

The device's own timer (TVM's time evaluator around ``invoke_stateful``)
does the timing; the device's outputs are checked against the local
reference (ONNX Runtime on the artifact's model.onnx), so wrong code on a
board is caught, not timed. On an emulated board that counts instructions
(``edgec device emulate``) the device also counts the instructions of one
inference (runtimes/icount.py), twice, to show the count is deterministic.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgec.core.artifact import Artifact
from edgec.core.errors import InputDataError, VerificationError
from edgec.core.numerics import compare, int8_tolerance
from edgec.runtimes.icount import InstructionCount, count, counts_instructions
from edgec.runtimes.session import Device


@dataclasses.dataclass
class BenchResult:
    artifact: str
    target: str
    device: str
    device_info: dict[str, Any]
    emulated: bool
    repeat: int
    warmup: int
    times_ms: list[float]
    check: dict[str, Any]
    macs: int = 0  # of the compiled model (manifest stats)
    instructions: InstructionCount | None = None  # per inference, on boards that count them

    @property
    def instructions_per_mac(self) -> float | None:
        return None if self.instructions is None else self.instructions.per_mac(self.macs)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p90_ms(self) -> float:
        ordered = sorted(self.times_ms)
        return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]

    @property
    def stdev_ms(self) -> float:
        return statistics.stdev(self.times_ms) if len(self.times_ms) > 1 else 0.0

    @property
    def throughput(self) -> float:
        """Inferences per second at the median latency."""
        return 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(
            mean_ms=self.mean_ms, median_ms=self.median_ms, p90_ms=self.p90_ms, stdev_ms=self.stdev_ms,
            throughput_per_s=self.throughput,
            instructions=None if self.instructions is None else {
                **self.instructions.as_dict(), "per_inference": self.instructions.per_call, "per_mac": self.instructions_per_mac,
            },
        )  # fmt: skip
        return data


# Warm-up lasts at least this long: on a fresh thread pool the first tens of
# milliseconds of runs were up to 2x slower here (a 0.3 ms model: ~45 slow
# runs), until the worker threads had settled on their own cores.
WARMUP_MS = 200


def warm_up(device: Device, vm, runs: int) -> None:
    """At least ``runs`` untimed runs and at least WARMUP_MS of them (none when ``runs`` is 0)."""
    if runs:
        vm.time_evaluator("invoke_stateful", device.dev, number=runs, repeat=1, min_repeat_ms=WARMUP_MS)("main")


def load_vm(device: Device, artifact: Artifact):
    from tvm import relax

    module = device.load(artifact)
    with device.step("creating the Relax VM"):
        return module, relax.VirtualMachine(module, device.dev)


def run_once(device: Device, vm, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """set_input / invoke_stateful / get_outputs: the calls that work over RPC."""
    with device.step("running the model"):
        vm.set_input("main", *(device.tensor(array) for array in inputs))
        vm.invoke_stateful("main")
        outputs = vm.get_outputs("main")
    return [tensor.numpy() for tensor in _flat(outputs)]


def _flat(value) -> list:
    if isinstance(value, (tuple, list)):
        return [item for part in value for item in _flat(part)]
    return [value]


def reference_check(
    artifact: Artifact, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], rtol: float, atol: float,
    qdq_steps: float = 1.0,
) -> dict[str, Any]:
    """Compare device outputs with the references compile checked the build against
    (edgec.runtimes.reference.build_references on the artifact's model.onnx and reference.onnx): every
    enforced one must agree; the entry shown is the first that does not, else the first. The rule is
    compile's (edgec.core.numerics.compare; an int8 QDQ graph: atol at least ``qdq_steps`` output
    quantization steps or 1.5 x ORT's fused kernels' distance from the graph as written, on this input or the
    largest compile measured on its seeded inputs, as edgec/verify.py)."""
    import onnx_ir as ir

    from edgec.runtimes.reference import build_references

    standard = ir.load(str(artifact.reference_onnx)) if artifact.reference_onnx is not None else None
    found, unchecked = build_references(ir.load(str(artifact.onnx)), inputs, standard, "reference.onnx")
    enforced = [reference for reference in found if reference.enforced]
    if not enforced:
        return {"reference": None, "ok": None, "note": unchecked or "no enforced reference for this graph"}
    names = [spec["name"] for spec in artifact.outputs]
    # an int8 build: the noise of correct implementations compile measured over its seeded inputs (output steps)
    noise = artifact.manifest.get("verification", {}).get("onnxruntime", {}).get("int8_noise_steps", 0.0)
    checks = []
    for reference in enforced:
        allowed = max(atol, int8_tolerance(reference.outputs, reference.fused, qdq_steps, noise)[0]) if reference.quantized else atol
        agreement = compare(outputs, reference.outputs, rtol=rtol, atol=allowed, names=names)
        checks.append({
            "reference": f"{reference.name} ({reference.graph})", "ok": agreement.ok, "max_abs": agreement.max_abs,
            "max_rel": agreement.max_rel, "detail": agreement.detail, "rtol": rtol, "atol": allowed,
        })  # fmt: skip
    return next((check for check in checks if not check["ok"]), checks[0])


def bench(
    artifact: Artifact,
    device: Device,
    inputs: Sequence[np.ndarray],
    *,
    repeat: int = 50,
    warmup: int = 5,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    qdq_steps: float = 1.0,
) -> BenchResult:
    if repeat < 1 or warmup < 0:
        raise InputDataError("--repeat must be >= 1 and --warmup >= 0")
    device.check_artifact(artifact)
    _module, vm = load_vm(device, artifact)
    outputs = run_once(device, vm, inputs)
    floor = artifact.manifest["target"].get("min_tolerance", 0.0)  # float16 builds are checked at least this loosely
    check = reference_check(artifact, inputs, outputs, max(rtol, floor), max(atol, floor), qdq_steps)
    if check["ok"] is False:  # wrong code is not timed
        raise VerificationError(
            f"the outputs of {device.label} differ from {check['reference']}: {check['detail']}; not timed. "
            "The code on the device is wrong, or --rtol/--atol too tight"
        )
    with device.step("timing the model"):
        warm_up(device, vm, warmup)
        timed = vm.time_evaluator("invoke_stateful", device.dev, number=1, repeat=repeat)("main")
    instructions = count(device, vm.module, "invoke_stateful", ["main"]) if counts_instructions(device) else None
    return BenchResult(
        artifact=str(artifact.path),
        target=artifact.manifest["target"]["spec"],
        device=device.label,
        device_info=device.info,
        emulated=device.emulated,
        repeat=repeat,
        warmup=warmup,
        times_ms=[seconds * 1e3 for seconds in timed.results],
        check=check,
        macs=int(artifact.manifest.get("stats", {}).get("macs", 0)),
        instructions=instructions,
    )
