"""Print the demo's summary table: one row per artifact directory.

    python examples/summary.py build/examples/mobilenet_v2_x86 build/examples/mobilenet_v2_cortex-a7
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgec.core.artifact import load_artifact

_MACHINES = {3: "x86", 40: "ARM", 62: "x86-64", 183: "AArch64"}


def elf_kind(path: Path) -> str:
    """'ELF 32-bit ARM' from the header bytes of a shared library."""
    header = path.read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        return "not an ELF file"
    bits = {1: "32-bit", 2: "64-bit"}.get(header[4], "?-bit")
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    return f"ELF {bits} {_MACHINES.get(machine, f'machine {machine}')}"


def check(verification: dict, reference: str) -> str:
    if verification.get("status") == "skipped":
        return "skipped (not host code)" if "cannot run" in verification["reason"] else "skipped"
    result = verification.get(reference)
    if result is None:
        return "n/a"
    verdict = "ok" if result["within_tolerance"] else "FAIL"
    return f"{verdict}: max abs {result['max_abs']:.1e}"


def main(paths: list[str]) -> None:
    table = Table(title="edgec demo: MobileNetV2 (TorchScript)", title_justify="left")
    for column in ("target", "lib.so", "size", "vs ONNX Runtime", "vs PyTorch", "compile s"):
        table.add_column(column)
    for path in paths:
        artifact = load_artifact(path)
        manifest = artifact.manifest
        seconds = sum(value for key, value in manifest["seconds"].items() if key != "verify")
        table.add_row(
            manifest["target"]["spec"],
            elf_kind(artifact.lib),
            f"{artifact.lib.stat().st_size / 1e6:.1f} MB",
            check(manifest["verification"], "onnxruntime"),
            check(manifest["verification"], "pytorch"),
            f"{seconds:.1f}",
        )
    Console(width=120).print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
