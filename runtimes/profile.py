"""``edgec profile``: per-kernel times measured on the device.

TVM 0.27 has no VM profiler, so each kernel of the artifact's kernel table
(manifest.json, captured at compile time) is made a global function on the
device (``edgec.profile.register_kernel``) and timed there by TVM's own time
evaluator, on random tensors of the recorded shapes. A kernel's time is its
median per call times its number of calls; the rows' sum is compared with
the end-to-end median. Timed alone, a kernel runs on warm caches: most of the rest is
the kernels running slower in sequence, a little is the VM's own work (allocation, builtins;
README, Performance, time outside the kernels).

On an emulated board that counts instructions (``edgec device emulate``) the
device also counts each kernel's instructions per call and the whole model's
per inference (runtimes/icount.py): exact and repeatable where the emulated
times are not. A kernel's MACs are those of the ONNX nodes it computes
(edgec/core/stats.py), so "instructions per MAC" reads the same as in bench.
"""

from __future__ import annotations

import dataclasses
import html
import statistics
import struct
from collections import OrderedDict
from typing import Any

import numpy as np

from edgec.core.artifact import KERNEL_CONSTANTS, Artifact
from edgec.core.errors import ArtifactError
from edgec.core.inputs import random_array
from edgec.runtimes.bench import load_vm, warm_up
from edgec.runtimes.icount import InstructionCount, count, counts_instructions
from edgec.runtimes.session import Device


WARMUP_RUNS = 3  # before the end-to-end timing (and at least bench.WARMUP_MS)


@dataclasses.dataclass
class KernelRow:
    kernel: str
    onnx_nodes: list[str]
    shapes: str
    calls: int
    ms_per_call: float
    flops_per_call: float
    macs_per_call: int = 0
    instructions: InstructionCount | None = None  # per call, on boards that count them
    fallbacks: list[str] = dataclasses.field(default_factory=list)  # schedule rules that failed on it

    @property
    def total_ms(self) -> float:
        return self.ms_per_call * self.calls

    @property
    def total_instructions(self) -> int | None:
        return None if self.instructions is None else self.instructions.per_call * self.calls

    @property
    def instructions_per_mac(self) -> float | None:
        return None if self.instructions is None else self.instructions.per_mac(self.macs_per_call)

    @property
    def gflops(self) -> float:
        """The kernel's FLOPs (TIR's estimate; where it has none, as for the int8 kernels' tensor
        intrinsics, 2 x the MACs of its ONNX nodes) per second, in billions."""
        flops = self.flops_per_call or 2.0 * self.macs_per_call
        return flops / (self.ms_per_call * 1e6) if self.ms_per_call > 0 else 0.0


@dataclasses.dataclass
class ProfileResult:
    artifact: str
    target: str
    device: str
    emulated: bool
    end_to_end_ms: float
    rows: list[KernelRow]
    macs: int = 0  # of the compiled model (manifest stats)
    end_to_end_instructions: InstructionCount | None = None  # per inference, on boards that count them
    fallbacks: list[dict[str, str]] = dataclasses.field(default_factory=list)  # the manifest's schedules.fallbacks

    @property
    def kernels_ms(self) -> float:
        return sum(row.total_ms for row in self.rows)

    @property
    def counted(self) -> bool:
        return self.end_to_end_instructions is not None

    @property
    def kernels_instructions(self) -> int | None:
        return sum(row.total_instructions for row in self.rows) if self.counted else None

    @property
    def instruction_coverage(self) -> float | None:
        """Sum of the kernels' instructions / the whole model's (the rest: the VM's own work)."""
        if not self.counted or self.end_to_end_instructions.per_call <= 0:
            return None
        return self.kernels_instructions / self.end_to_end_instructions.per_call

    def instruction_percent(self, row: KernelRow) -> float | None:
        if not self.counted or self.end_to_end_instructions.per_call <= 0:
            return None
        return 100.0 * row.total_instructions / self.end_to_end_instructions.per_call

    @property
    def instructions_per_mac(self) -> float | None:
        return self.end_to_end_instructions.per_mac(self.macs) if self.counted else None

    @property
    def coverage(self) -> float:
        """Sum of kernel rows / end-to-end time."""
        return self.kernels_ms / self.end_to_end_ms if self.end_to_end_ms > 0 else 0.0

    def percent(self, row: KernelRow) -> float:
        return 100.0 * row.total_ms / self.end_to_end_ms if self.end_to_end_ms > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        counted = self.end_to_end_instructions
        return {
            "artifact": self.artifact,
            "target": self.target,
            "device": self.device,
            "emulated": self.emulated,
            "end_to_end_ms": self.end_to_end_ms,
            "kernels_ms": self.kernels_ms,
            "coverage": self.coverage,
            "fallbacks": self.fallbacks,
            "macs": self.macs,
            "instructions": None if counted is None else {
                **counted.as_dict(), "per_inference": counted.per_call, "per_mac": self.instructions_per_mac,
                "kernels": self.kernels_instructions, "coverage": self.instruction_coverage,
            },
            "rows": [
                {
                    **{key: value for key, value in dataclasses.asdict(row).items() if key != "instructions"},
                    "total_ms": row.total_ms, "percent": self.percent(row), "gflops": row.gflops,
                    "instructions": None if row.instructions is None else {
                        **row.instructions.as_dict(), "total": row.total_instructions,
                        "percent": self.instruction_percent(row), "per_mac": row.instructions_per_mac,
                    },
                }
                for row in self.rows
            ],
        }  # fmt: skip


def kernel_constants(artifact: Artifact) -> dict[str, np.ndarray]:
    """The integer constants kernels read (sparse indices): timing needs the real ones."""
    wanted = {spec["constant"] for call in artifact.manifest["kernels"] for spec in call["args"] if "constant" in spec}
    if not wanted:
        return {}
    path = artifact.path / KERNEL_CONSTANTS
    try:
        with np.load(path) as stored:
            return {key: stored[key] for key in wanted}
    except (OSError, KeyError, ValueError) as error:
        raise ArtifactError(f"artifact '{artifact.path}': cannot read {KERNEL_CONSTANTS} ({error}); recompile it") from error


def kernel_arguments(call: dict[str, Any], constants: dict[str, np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The arrays one kernel call is timed on: its integer constants as stored at compile time
    (they decide how much work the kernel does), random tensors of the recorded shapes otherwise."""
    return [
        constants[spec["constant"]] if "constant" in spec else random_array(spec["shape"], spec["dtype"], rng)
        for spec in call["args"] + call["outputs"]
    ]


def node_macs_by_name(artifact: Artifact) -> dict[str, int]:
    """MACs of each named node of the artifact's model.onnx (the graph the kernel table refers to)."""
    import onnx_ir as ir

    from edgec.core.stats import node_macs

    return {node.name: node_macs(node) for node in ir.load(str(artifact.onnx)).graph if node.name}


def profile(artifact: Artifact, device: Device, *, repeat: int = 10, seed: int = 0) -> ProfileResult:
    calls = artifact.manifest.get("kernels")
    if not calls:
        raise ArtifactError(f"artifact '{artifact.path}' has no kernel table; recompile it with this edgec version")
    device.check_artifact(artifact)
    counting = counts_instructions(device)
    module, vm = load_vm(device, artifact)
    rng = np.random.default_rng(seed)
    inputs = [random_array(spec["shape"], spec["dtype"], rng, spec.get("index_range")) for spec in artifact.inputs]
    with device.step("timing the model end to end"):
        vm.set_input("main", *(device.tensor(array) for array in inputs))
        vm.invoke_stateful("main")
        warm_up(device, vm, WARMUP_RUNS)
        timed = vm.time_evaluator("invoke_stateful", device.dev, number=1, repeat=repeat)("main")
        end_to_end_ms = statistics.median(timed.results) * 1e3
    end_to_end_instructions = count(device, vm.module, "invoke_stateful", ["main"]) if counting else None
    macs_of = node_macs_by_name(artifact)
    grouped: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for call in calls:
        grouped.setdefault(call["kernel"], []).append(call)
    constants = kernel_constants(artifact)
    evaluator = device.evaluator()
    rows = []
    for index, (kernel, kernel_calls) in enumerate(grouped.items()):
        first = kernel_calls[0]
        global_name = f"edgec.profile.kernel.{index}"
        with device.step(f"timing kernel {kernel}"):
            device.register_kernel(module, kernel, global_name)
            arguments = [device.tensor(array) for array in kernel_arguments(first, constants, rng)]
            dev = device.dev
            timer = evaluator(None, global_name, device.device_type_on_device(), dev.index, 1, repeat, 0, 100, 0, 1, 0, "")
            blob = timer(*arguments)
        instructions = count(device, None, global_name, arguments) if counting else None
        seconds = struct.unpack("@" + "d" * repeat, bytes(blob))
        nodes: list[str] = []
        for call in kernel_calls:
            nodes.extend(node for node in call.get("onnx_nodes", []) if node not in nodes)
        shapes = " ".join("x".join(map(str, spec["shape"] or [])) for spec in first["args"][:2])
        shapes += " -> " + " ".join("x".join(map(str, spec["shape"] or [])) for spec in first["outputs"])
        fell_back = sorted({rule for call in kernel_calls for rule in call.get("fallbacks", [])})
        macs = sum(macs_of.get(node, 0) for node in first.get("onnx_nodes", []))
        rows.append(
            KernelRow(
                kernel, nodes, shapes, len(kernel_calls), statistics.median(seconds) * 1e3, first["flops"], macs,
                instructions, fell_back,
            )
        )
    # Counted: by instructions, which do not move between runs; else by time.
    rows.sort(key=lambda row: -(row.total_instructions if counting else row.total_ms))
    return ProfileResult(
        artifact=str(artifact.path),
        target=artifact.manifest["target"]["spec"],
        device=device.label,
        emulated=device.emulated,
        end_to_end_ms=end_to_end_ms,
        rows=rows,
        fallbacks=list(artifact.manifest.get("schedules", {}).get("fallbacks", [])),
        macs=int(artifact.manifest.get("stats", {}).get("macs", 0)),
        end_to_end_instructions=end_to_end_instructions,
    )


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_html(result: ProfileResult, path) -> None:
    """A self-contained HTML report: one horizontal bar per kernel, widest = most instructions (counted) or slowest."""
    counted = result.counted

    def weight(row: KernelRow) -> float:
        return float(row.total_instructions) if counted else row.total_ms

    top = max((weight(row) for row in result.rows), default=1.0) or 1.0
    banner = ""
    if result.emulated:
        banner = "<p class='warn'>Emulated device (qemu): these timings say nothing about real hardware."
        if counted:
            cpu = html.escape(result.end_to_end_instructions.cpu or "the emulated CPU")
            banner += f" Instruction counts are exact for {cpu}."
        banner += "</p>"
    lines = []
    for row in result.rows:
        width = 100.0 * weight(row) / top
        nodes = html.escape(", ".join(row.onnx_nodes) or "-")
        mark = f" <span class='warn'>fell back: {html.escape(', '.join(row.fallbacks))}</span>" if row.fallbacks else ""
        counts = (
            f"<td class='n'>{_count(row.total_instructions)}</td><td class='n'>{_ratio(result.instruction_percent(row), 1)}</td>"
            f"<td class='n'>{_ratio(row.instructions_per_mac)}</td>"
            if counted
            else ""
        )
        lines.append(
            f"<tr><td class='k'>{html.escape(row.kernel)}{mark}</td><td>{nodes}</td><td>{html.escape(row.shapes)}</td>"
            f"<td class='n'>{row.calls}</td>{counts}<td class='n'>{row.total_ms:.3f}</td><td class='n'>{result.percent(row):.1f}</td>"
            f"<td class='n'>{row.gflops:.2f}</td><td class='bar'><div style='width:{width:.1f}%'></div></td></tr>"
        )
    count_heads = "<th>instructions</th><th>% instr.</th><th>instr. / MAC</th>" if counted else ""
    summary = ""
    if counted:
        whole = result.end_to_end_instructions
        summary = (
            f"<p>instructions per inference {whole.per_call:,} ({'deterministic' if whole.deterministic else 'NOT deterministic: runs counted ' + ', '.join(f'{run:,}' for run in whole.runs)}); "
            f"{_ratio(result.instructions_per_mac)} per MAC; kernels sum {result.kernels_instructions:,} "
            f"({100 * result.instruction_coverage:.1f}% of the whole; the rest is the VM's own work)</p>"
        )
    document = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgec profile: {html.escape(result.artifact)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.k {{ font-family: monospace; }}
td.bar {{ width: 30%; }}
td.bar div {{ background: #3b82f6; height: 14px; }}
.warn {{ color: #b45309; font-weight: bold; }}
</style></head><body>
<h1>edgec profile</h1>
<p>artifact <code>{html.escape(result.artifact)}</code> ({html.escape(result.target)}) on {html.escape(result.device)}</p>
{banner}
{summary}
<p>end to end (median) {result.end_to_end_ms:.3f} ms; kernels sum {result.kernels_ms:.3f} ms
({100 * result.coverage:.1f}% of end to end; kernels timed alone, on warm caches)</p>
<table><thead><tr><th>kernel</th><th>ONNX nodes</th><th>shapes (inputs -> output)</th><th>calls</th>
{count_heads}<th>ms{' (emulated)' if result.emulated else ''}</th><th>%</th><th>GFLOP/s</th><th>{'instructions' if counted else 'time'} (bar)</th></tr></thead><tbody>
{chr(10).join(lines)}
</tbody></table></body></html>
"""
    from pathlib import Path

    Path(path).write_text(document)
