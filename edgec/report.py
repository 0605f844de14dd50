"""What the CLI prints on stdout: rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np


def _console():
    from rich.console import Console

    import shutil

    return Console(highlight=False, soft_wrap=False, width=max(100, shutil.get_terminal_size().columns))


def _si(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def compile_summary(result) -> None:
    from rich.table import Table

    manifest = result.manifest
    artifact = result.artifact
    table = Table(title=f"edgec compile -> {artifact.path}", title_justify="left")
    table.add_column("item")
    table.add_column("value")
    table.add_row("source", f"{manifest['source']['path']} ({manifest['source']['format']})")
    table.add_row("target", f"{manifest['target']['spec']}  {json.dumps(manifest['target']['tvm'])}")
    for spec in manifest["inputs"]:
        table.add_row("input", f"{spec['name']} {tuple(spec['shape'])} {spec['dtype']}")
    for spec in manifest["outputs"]:
        table.add_row("output", f"{spec['name']} {tuple(spec['shape'])} {spec['dtype']}")
    stats = manifest["stats"]
    table.add_row("params / MACs", f"{_si(stats['params'])} / {_si(stats['macs'])}")
    table.add_row("weights", _si(stats["size_bytes"], "B"))
    for name in manifest["files"]:
        size = (artifact.path / name).stat().st_size
        table.add_row(f"file {name}", _si(size, "B"))
    verification = manifest["verification"]
    if verification["status"] == "skipped":
        table.add_row("verification", f"skipped: {verification['reason']}")
    else:
        if "ran_on" in verification:
            table.add_row("verified on", verification["ran_on"])
        for reference in ("float64", "onnxruntime", "numpy", "pytorch"):
            if reference in verification:
                check = verification[reference]
                verdict = "ok" if check["within_tolerance"] else ("FAILED" if check["enforced"] else "differs (lossy passes)")
                tolerance = f"rtol {verification['rtol']:g}, atol {verification['atol']:g}"
                if not check["within_tolerance"] and not check["enforced"] and check.get("note"):
                    verdict = f"differs, not enforced: {check['note']}"
                if "rule" in check:  # an int8 (QDQ) graph: its own allowance, on model.onnx as written
                    tolerance, verdict = check["rule"], f"{verdict}, on {check['graph']}"
                elif reference in ("onnxruntime", "float64") and check.get("graph", "model.onnx") != "model.onnx":
                    verdict += ", on reference.onnx (standard-ONNX equivalent)"
                table.add_row(
                    f"vs {reference}",
                    f"max abs {check['max_abs']:.2e}, max rel {check['max_rel']:.2e} ({tolerance}): {verdict}",
                )
    times = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in manifest["seconds"].items())
    table.add_row("time", times)
    console = _console()
    console.print(table)
    if manifest["passes"]:
        console.print(passes_table(manifest["passes"]))


def passes_table(reports: list[dict]):
    from rich.table import Table

    table = Table(title="passes", title_justify="left")
    for column in ("pass", "modified", "nodes changed", "params", "MACs", "size", "max abs dev", "max rel dev"):
        table.add_column(column, justify="right" if column != "pass" else "left")
    for report in reports:
        abs_dev = "n/a" if report["max_abs_deviation"] is None else f"{report['max_abs_deviation']:.2e}"
        rel_dev = "n/a" if report["max_rel_deviation"] is None else f"{report['max_rel_deviation']:.2e}"
        table.add_row(
            report["name"],
            "yes" if report["modified"] else "no",
            str(report["nodes_changed"]),
            f"{_si(report['params_before'])} -> {_si(report['params_after'])}",
            f"{_si(report['macs_before'])} -> {_si(report['macs_after'])}",
            f"{_si(report['size_before'], 'B')} -> {_si(report['size_after'], 'B')}",
            abs_dev,
            rel_dev,
        )
    return table


def output_summary(artifact, outputs: list[np.ndarray], written: Path | None, as_json: bool) -> None:
    rows = []
    for spec, array in zip(artifact.outputs, outputs, strict=True):
        flat = array.reshape(-1)
        row = {
            "name": spec["name"],
            "shape": list(array.shape),
            "dtype": array.dtype.name,
            "min": float(flat.min()) if flat.size else None,
            "max": float(flat.max()) if flat.size else None,
            "mean": float(flat.mean()) if flat.size else None,
        }
        if array.ndim == 2 and array.shape[0] == 1 and array.shape[1] > 1:
            top = np.argsort(-array[0])[:5]
            row["top5"] = [[int(index), float(array[0, index])] for index in top]
        rows.append(row)
    if as_json:
        click.echo(json.dumps({"artifact": str(artifact.path), "outputs": rows, "written": str(written) if written else None}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"edgec run {artifact.path}", title_justify="left")
    for column in ("output", "shape", "dtype", "min", "max", "mean", "top-5 (index: value)"):
        table.add_column(column)
    for row in rows:
        top = ", ".join(f"{index}: {value:.3f}" for index, value in row.get("top5", []))
        table.add_row(
            row["name"], str(tuple(row["shape"])), row["dtype"], f"{row['min']:.4g}", f"{row['max']:.4g}", f"{row['mean']:.4g}", top
        )
    console = _console()
    console.print(table)
    if written:
        console.print(f"outputs written to {written}")


def inspect_table(model, as_json: bool) -> None:
    from edgec.core.stats import model_stats

    stats = model_stats(model.graph)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "source": str(model.source),
                    "format": model.source_format,
                    **stats.as_dict(),
                    "layers": [
                        {"name": l.name, "op": l.op_type, "output_shape": l.output_shape, "params": l.params, "macs": l.macs,
                         **({"int8": l.int8.as_dict()} if l.int8 else {})}  # fmt: skip
                        for l in stats.layers
                    ],
                },
                indent=2,
            )
        )
        return
    from rich.table import Table

    quantized = [layer for layer in stats.layers if layer.int8]
    table = Table(title=f"{model.source} ({model.source_format})", title_justify="left")
    columns = ("#", "node", "op", "output shape", "params", "MACs") + (("int8 scales",) if quantized else ())
    for column in columns:
        table.add_column(column, justify="right" if column in ("#", "params", "MACs") else "left")
    for index, layer in enumerate(stats.layers):
        shape = "x".join(map(str, layer.output_shape)) if layer.output_shape else "?"
        row = [str(index), layer.name, layer.op_type, shape, f"{layer.params:,}", f"{layer.macs:,}"]
        table.add_row(*row, *((layer.int8.describe() if layer.int8 else "",) if quantized else ()))
    console = _console()
    console.print(table)
    if quantized:
        weighted = [layer for layer in stats.layers if layer.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
        console.print(f"int8: {len(quantized)} of {len(weighted)} Conv/Gemm/MatMul layers have int8 weights "
                      "(x: input scale, w: weight scales, y: output scale; float: not quantized there)")
    ops = ", ".join(f"{op} x{count}" for op, count in sorted(stats.op_counts.items(), key=lambda item: -item[1]))
    console.print(f"total: {stats.params:,} parameters, {stats.macs:,} MACs ({_si(stats.macs)}), "
                  f"weights {_si(stats.size_bytes, 'B')}; ops: {ops}")


def targets_table(as_json: bool) -> None:
    from edgec.targets import PRESETS, required_tools, resolve

    rows = []
    for name, preset in PRESETS.items():
        resolved = resolve(name)
        tools = required_tools(preset)
        rows.append(
            {
                "name": name,
                "description": preset.description,
                "tvm_target": resolved.tvm_json,
                "host": resolved.host_json,
                "options": dict(preset.options),
                "runs_here": preset.host_runnable,
                "toolchain": [{"tool": t.tool, "path": t.path, "install": None if t.found else t.install_hint} for t in tools],
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="edgec targets", title_justify="left", show_lines=True)
    for column in ("preset", "description", "TVM target", "toolchain"):
        table.add_column(column, overflow="fold")
    for row in rows:
        tools = "\n".join(
            f"[green]found[/] {t['tool']}" if t["path"] else f"[red]missing[/] {t['tool']}: {t['install']}" for t in row["toolchain"]
        )
        name = row["name"] + "".join(f"\n  {key}={value}" for key, value in row["options"].items())
        table.add_row(name, row["description"], json.dumps(row["tvm_target"]), tools)
    _console().print(table)


def passes_list(as_json: bool) -> None:
    from edgec.passes.registry import all_passes, describe

    entries = []
    for name, cls in all_passes().items():
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        entries.append({"name": name, "class": cls.__name__, "summary": summary, "options": describe(cls)})
    if as_json:
        click.echo(json.dumps(entries, indent=2, default=repr))
        return
    console = _console()
    if not entries:
        console.print("no passes are registered")
        return
    from rich.table import Table

    table = Table(title="edgec passes  (use: edgec compile MODEL -t TARGET -p NAME[:key=value,...])", title_justify="left", show_lines=True)
    for column in ("pass", "what it does", "options (default)"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        options = "\n".join(
            f"{o['name']}={o['default']!r} ({o['type']}): {o['help']}" for o in entry["options"]
        ) or "none"
        table.add_row(f"{entry['name']}\n({entry['class']})", entry["summary"], options)
    console.print(table)


EMULATED_NOTE = "EMULATED device (qemu): timings are meaningless, only correctness counts"
COUNTED_NOTE = "EMULATED device (qemu): timings are meaningless; instruction counts are exact for the emulated CPU, not a time"


def instruction_summary(count, per_mac: float | None) -> str:
    """'139,612,004 (emulated cortex-a7, deterministic); 0.46 per MAC' for an InstructionCount (runtimes/icount.py)."""
    where = f"emulated {count.cpu}" if count.cpu else "emulated"
    how = "deterministic" if count.deterministic else "NOT deterministic: runs counted " + ", ".join(f"{run:,}" for run in count.runs)
    if count.other_threads:
        how += f"; other threads ran {count.other_threads:,} meanwhile, so this is one thread's share"
    text = f"{count.per_call:,} ({where}, {how})"
    return text + (f"; {per_mac:.2f} per MAC" if per_mac is not None else "")


def bench_summary(result, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    from rich.table import Table

    title = f"edgec bench {result.artifact} ({result.target}) on {result.device}"
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    suffix = " (emulated)" if result.emulated else ""
    for name, value in (("mean", result.mean_ms), ("median", result.median_ms), ("p90", result.p90_ms), ("stdev", result.stdev_ms)):
        table.add_row(f"{name} ms{suffix}", f"{value:.3f}")
    table.add_row(f"throughput /s{suffix}", f"{result.throughput:.2f}")
    table.add_row("runs", f"{result.repeat} (+{result.warmup} warm-up)")
    if result.instructions is not None:
        table.add_row("instructions / inference", instruction_summary(result.instructions, result.instructions_per_mac))
    info = result.device_info
    table.add_row("device", f"{info.get('agent')} {info.get('machine')} ({info.get('cpu_arch')}, {info.get('num_cores')} cores)")
    if info.get("gpu"):
        gpu = info["gpu"]
        table.add_row("GPU", f"{gpu['name']} ({gpu['arch']}), driver runs CUDA {gpu.get('driver_cuda', '?')}")
    check = result.check
    if check.get("ok") is None:
        table.add_row("output check", check.get("note", "not run"))
    else:
        verdict = "ok" if check["ok"] else "MISMATCH"
        table.add_row(f"output vs {check['reference']}", f"{verdict}: max abs {check['max_abs']:.2e}, max rel {check['max_rel']:.2e}")
    console = _console()
    console.print(table)
    if result.instructions is not None:
        console.print(f"instructions per inference {instruction_summary(result.instructions, result.instructions_per_mac)}")
    if result.emulated:
        console.print(f"[bold yellow]{COUNTED_NOTE if result.instructions is not None else EMULATED_NOTE}[/]")


def profile_summary(result, as_json: bool, html_path) -> None:
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    from rich.table import Table

    table = Table(title=f"edgec profile {result.artifact} ({result.target}) on {result.device}", title_justify="left")
    counted = result.counted
    columns = ["kernel", "ONNX nodes", "shapes", "calls"]
    columns += ["instructions", "% instr.", "instr./MAC"] if counted else []
    columns += ["ms (emulated)" if result.emulated else "ms", "%", "GFLOP/s"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("kernel", "ONNX nodes", "shapes") else "right", overflow="fold")
    for row in result.rows:
        nodes = ", ".join(row.onnx_nodes[:3]) + (f" +{len(row.onnx_nodes) - 3}" if len(row.onnx_nodes) > 3 else "")
        kernel = row.kernel + (" *" if row.fallbacks else "")
        cells = [kernel, nodes or "-", row.shapes, str(row.calls)]
        if counted:
            percent, per_mac = result.instruction_percent(row), row.instructions_per_mac
            cells += [f"{row.total_instructions:,}", f"{percent:.1f}", "-" if per_mac is None else f"{per_mac:.2f}"]
        cells += [f"{row.total_ms:.3f}", f"{result.percent(row):.1f}", f"{row.gflops:.2f}"]
        table.add_row(*cells)
    console = _console()
    console.print(table)
    for row in result.rows:
        if row.fallbacks:
            console.print(f"* {row.kernel}: fell back from {', '.join(row.fallbacks)} (schedules.fallbacks in manifest.json)")
    whole = [record for record in result.fallbacks if record["kernel"] == "*"]
    for record in whole:
        console.print(f"* every kernel: {record['rule']} fell back ({record['reason']})")
    if counted:
        console.print(
            f"instructions per inference {instruction_summary(result.end_to_end_instructions, result.instructions_per_mac)}; "
            f"kernels sum {result.kernels_instructions:,} = {100 * result.instruction_coverage:.1f}% of the whole"
        )
    console.print(
        f"end to end {result.end_to_end_ms:.3f} ms (median); kernels sum {result.kernels_ms:.3f} ms = "
        f"{100 * result.coverage:.1f}% of end to end" + (" (emulated)" if result.emulated else "")
    )
    if result.emulated:
        console.print(f"[bold yellow]{COUNTED_NOTE if counted else EMULATED_NOTE}[/]")
    if html_path:
        console.print(f"HTML report: {html_path}")
