"""Constants and small helpers shared by the backbone tests (not fixtures: see conftest.py)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

FORMATS = ("torchscript", "export", "onnx", "pickle")
SUFFIX = {"torchscript": ".pt", "export": ".pt2", "onnx": ".onnx", "pickle": ".pkl"}
# what edgec.frontend.sniff_format calls each of them
SOURCE_FORMAT = {"torchscript": "torchscript", "export": "torch.export", "onnx": "onnx", "pickle": "pickle"}
# the format each model is compiled from for x86, so that every format reaches a build once
X86_SOURCE = {"mobilenet": "export", "resnet": "torchscript", "vgg": "onnx", "mlp": "pickle"}

RTOL = 1e-4
ATOL = 1e-4

needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")


def disassembly(lib) -> str:
    """``objdump -d`` of the shared library ``lib`` without the instruction bytes: one line per
    instruction, its address, mnemonic and operands (``needs_objdump``)."""
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True, check=True).stdout


def leftovers(parent: Path) -> list[str]:
    """Staging directories (``.NAME.tmp-*``, ``.NAME.old-*``) left in ``parent``."""
    return sorted(path.name for path in parent.iterdir() if ".tmp-" in path.name or ".old-" in path.name)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def elf_header(path: Path) -> dict[str, int]:
    """The identifying fields of an ELF file's header, parsed from its bytes.

    e_ident: magic 0x7f 'E' 'L' 'F', EI_CLASS (1: 32-bit, 2: 64-bit),
    EI_DATA (1: little endian); then e_type (3: ET_DYN, a shared object) and
    e_machine (40: ARM, 62: x86-64, 183: AArch64) as 16-bit words.
    """
    data = path.read_bytes()[:20]
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file (starts with {data[:4]!r})")
    ei_class, ei_data = data[4], data[5]
    order = "<" if ei_data == 1 else ">"
    e_type, e_machine = struct.unpack(order + "HH", data[16:20])
    return {"class": ei_class, "data": ei_data, "type": e_type, "machine": e_machine}


def assert_board_verified(manifest: dict, preset: str) -> None:
    """An ARM build is verified on the emulated board (edgec-agent under qemu-user) when qemu is
    installed, and skipped with that reason only when it is not."""
    import shutil

    from edgec.runtimes.emulate import EMULATORS
    from edgec.targets.presets import PRESETS

    verification = manifest["verification"]
    if shutil.which(EMULATORS[PRESETS[preset].cpu_arch].qemu) is None:
        assert verification["status"] == "skipped" and "qemu-user-static" in verification["reason"]
        return
    assert verification["status"] == "passed", verification
    assert verification["ran_on"].startswith(f"emulated {preset}")
    assert all(check["within_tolerance"] for key, check in verification.items() if isinstance(check, dict))


def assert_profile_adds_up(data: dict, manifest: dict) -> None:
    """Structural checks of an ``edgec profile`` result (``--json`` / ``as_dict()``) against the
    artifact's kernel table. Deliberately no timing window: on a shared 2-core machine the ratio
    of the kernels' sum to the end-to-end time moved between 0.83 and 1.34 run to run."""
    calls: dict[str, int] = {}
    for call in manifest["kernels"]:
        calls[call["kernel"]] = calls.get(call["kernel"], 0) + 1
    rows = data["rows"]
    assert {row["kernel"]: row["calls"] for row in rows} == calls, "one row per kernel, with its number of calls"
    assert data["end_to_end_ms"] > 0 and all(row["ms_per_call"] > 0 for row in rows)
    for row in rows:
        assert abs(row["total_ms"] - row["ms_per_call"] * row["calls"]) <= 1e-9 * max(1.0, row["total_ms"])
    assert abs(data["kernels_ms"] - sum(row["total_ms"] for row in rows)) <= 1e-9 * max(1.0, data["kernels_ms"])
    assert abs(data["coverage"] - data["kernels_ms"] / data["end_to_end_ms"]) <= 1e-9
    order = "total_ms" if data.get("instructions") is None else "instructions"  # counted boards: by instructions
    weights = [row["total_ms"] if order == "total_ms" else row["instructions"]["total"] for row in rows]
    assert weights == sorted(weights, reverse=True)


def make_onnx(nodes, inputs: dict, outputs: dict, initializers: dict, path: Path | None = None):
    """An onnx_ir model of float32 ``nodes`` (opset 17, shapes inferred); also saved at ``path``."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()],
        [numpy_helper.from_array(np.asarray(array), name) for name, array in initializers.items()],
    )
    proto = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    if path is not None:
        onnx.save(proto, path)
    return ir.serde.deserialize_model(proto)


def invoke(*args):
    """``edgec ARGS...`` in this process (click's CliRunner); the result has stdout and stderr apart."""
    from click.testing import CliRunner

    from edgec.cli import cli

    return CliRunner().invoke(cli, [str(arg) for arg in args], prog_name="edgec")


def one_error_line(result, *words: str) -> str:
    """Exit status 1, exactly one ``Error:`` line naming ``words``, no traceback, nothing on stdout."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def traced_model(module, shape, path: Path):
    """``module`` (eval mode, seed 0) traced on a random input of ``shape``, saved as TorchScript
    at ``path`` and loaded by edgec."""
    import torch

    import edgec

    torch.manual_seed(0)
    module = module.eval()
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(module, (torch.randn(*shape),)), str(path))
    return edgec.load(path, input_shape=shape)


# why compile's int8 check is looser on x86 CPUs without VNNI (README, Known limits)
SATURATION = (
    "ONNX Runtime's fused u8s8 kernels saturate without VNNI (int16 pair sums), so compile's int8 allowance, "
    "1.5x their distance from the QDQ graph as written, is wider there than the errors these tests inject"
)


def require_host_features(*features: str, why: str) -> None:
    """Skip the calling test unless this machine's x86 target (what ``-t x86`` builds for) has every
    LLVM CPU feature in ``features`` (e.g. "avx512f", "avx512vnni"); ``why``: what depends on them."""
    import pytest
    import tvm
    from tvm.target import codegen

    from edgec.targets import resolve

    have = set(codegen.llvm_get_cpu_features(tvm.target.Target(resolve("x86").tvm_json)))
    missing = [feature for feature in features if feature not in have]
    if missing:
        pytest.skip(f"this machine's CPU lacks {', '.join(missing)}: {why}")
