"""Target presets -> TVM target JSON (docs/architecture.md, Pins); options; toolchains."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

import edgec
from edgec.core.errors import ArtifactError, TargetError, ToolchainError
from edgec.targets import PRESETS, TargetPreset, require_linker, required_tools, resolve
from edgec.targets import host as target_host
from edgec.targets.resolve import parse_spec

# the JSON TVM 0.27 takes for each board (docs/architecture.md, Pins)
EXPECTED_TVM_JSON = {
    "cortex-a7": {
        "kind": "llvm",
        "mtriple": "armv7a-linux-gnueabihf",
        "mcpu": "cortex-a7",
        "mattr": ["+neon", "+vfp4", "-slowfpvfmx"],
        "mfloat-abi": "hard",
    },
    "cortex-a53": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53", "mattr": ["+neon"]},
    "cortex-a55": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55", "mattr": ["+neon", "+dotprod"]},
    "cortex-a72": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]},
}


def test_registry_holds_the_presets():
    assert set(PRESETS) == {"x86", "cortex-a7", "cortex-a53", "cortex-a55", "cortex-a72", "cuda"}
    for name, preset in PRESETS.items():
        assert preset.name == name
        assert preset.description


@pytest.mark.parametrize("name", sorted(EXPECTED_TVM_JSON))
def test_arm_presets_tvm_json(name):
    resolved = resolve(name)
    assert resolved.tvm_json == EXPECTED_TVM_JSON[name]
    assert resolved.host_json is None
    assert resolved.spec == name
    # TVM accepts the JSON and keeps every field
    target = resolved.tvm_target()
    assert str(target.kind.name) == "llvm"
    assert str(target.attrs["mtriple"]) == EXPECTED_TVM_JSON[name]["mtriple"]
    assert str(target.attrs["mcpu"]) == name
    assert [str(attr) for attr in target.attrs["mattr"]] == EXPECTED_TVM_JSON[name]["mattr"]


def test_x86_uses_the_detected_cpu_never_native():
    resolved = resolve("x86")
    host_cpu = target_host.host_cpu_name()
    assert resolved.tvm_json == {"kind": "llvm", "mcpu": host_cpu}
    assert host_cpu and host_cpu != "native"
    assert "native" not in str(resolved.tvm_json)
    assert str(resolved.tvm_target().attrs["mcpu"]) == host_cpu
    assert resolved.preset.host_runnable


@pytest.fixture
def fresh_host_cpu():
    target_host.host_cpu_name.cache_clear()
    yield
    target_host.host_cpu_name.cache_clear()


@pytest.mark.parametrize("detected", ["generic", "", RuntimeError("no LLVM")])
def test_x86_falls_back_to_a_generic_cpu(monkeypatch, fresh_host_cpu, detected):
    from tvm.target import codegen

    def fake():
        if isinstance(detected, Exception):
            raise detected
        return detected

    monkeypatch.setattr(codegen, "llvm_get_system_cpu", fake)
    resolved = resolve("x86")
    assert resolved.tvm_json["mcpu"] == "x86-64-v2"
    assert str(resolved.tvm_target().attrs["mcpu"]) == "x86-64-v2"


def test_cuda_default_and_host():
    resolved = resolve("cuda")
    assert resolved.tvm_json == {"kind": "cuda", "arch": "sm_80"}
    assert resolved.host_json == {"kind": "llvm", "mcpu": "x86-64"}  # generic: any GPU server's CPU
    assert resolved.spec == "cuda:arch=sm_80,dtype=float32"
    target = resolved.tvm_target()
    assert str(target.kind.name) == "cuda"
    assert str(target.attrs["arch"]) == "sm_80"
    assert str(target.host.kind.name) == "llvm"


@pytest.mark.parametrize("arch", ["sm_86", "sm_90a", "sm_100"])
def test_cuda_arch_option(arch):
    resolved = resolve(f"cuda:arch={arch}")
    assert resolved.tvm_json == {"kind": "cuda", "arch": arch}
    assert resolved.options == {"arch": arch, "dtype": "float32"}
    assert resolved.spec == f"cuda:arch={arch},dtype=float32"
    assert resolve(resolved.spec) == resolved


@pytest.mark.parametrize("arch", ["compute_80", "sm80", "86", "sm_8"])
def test_cuda_bad_arch(arch):
    with pytest.raises(TargetError) as error:
        resolve(f"cuda:arch={arch}")
    message = str(error.value)
    assert repr(arch) in message
    assert "sm_80" in message and "sm_XY" in message


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(TargetError) as error:
        resolve("cuda:cores=4")
    assert "cores" in str(error.value)
    assert "arch" in str(error.value)
    with pytest.raises(TargetError) as error:
        resolve("cortex-a7:arch=sm_80")
    assert "its options are: none" in str(error.value)


@pytest.mark.parametrize("spec", ["cuda:arch", "cuda:=sm_80", "cuda:arch="])
def test_malformed_option(spec):
    with pytest.raises(TargetError) as error:
        resolve(spec)
    assert "key=value" in str(error.value)


def test_parse_spec():
    assert parse_spec(" cuda : arch = sm_86 ") == ("cuda", {"arch": "sm_86"})
    assert parse_spec("x86") == ("x86", {})
    assert parse_spec("cuda:") == ("cuda", {})


@pytest.mark.parametrize("spec", ["cortex-a9", "X86", "arm", ""])
def test_unknown_target_lists_presets(spec):
    with pytest.raises(TargetError) as error:
        resolve(spec)
    message = str(error.value)
    assert f"unknown target {spec!r}" in message
    for name in PRESETS:
        assert name in message
    assert isinstance(error.value, edgec.EdgecError)


def test_presets_are_frozen_and_validated():
    preset = PRESETS["cortex-a7"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.mcpu = "cortex-a9"  # type: ignore[misc]
    with pytest.raises(ValueError, match="kind"):
        dataclasses.replace(preset, kind="vulkan")
    with pytest.raises(ValueError, match="elf_bits"):
        dataclasses.replace(preset, elf_bits=16)
    assert isinstance(preset, TargetPreset)


@pytest.mark.parametrize(
    ("name", "compiler", "package"),
    [
        ("cortex-a7", "arm-linux-gnueabihf-g++", "g++-arm-linux-gnueabihf"),
        ("cortex-a53", "aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
        ("cortex-a72", "aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
    ],
)
def test_missing_cross_compiler_names_the_debian_package(monkeypatch, name, compiler, package):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool, *a, **k: None if tool == compiler else real_which(tool, *a, **k))
    with pytest.raises(ToolchainError) as error:
        require_linker(PRESETS[name])
    message = str(error.value)
    assert compiler in message and f"apt-get install {package}" in message
    assert isinstance(error.value, TargetError)
    (status,) = required_tools(PRESETS[name])
    assert status.tool == compiler and not status.found
    assert package in status.install_hint


def test_empty_path_means_no_compilers(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolchainError, match="g\\+\\+-arm-linux-gnueabihf"):
        require_linker(PRESETS["cortex-a7"])
    with pytest.raises(ToolchainError, match="apt-get install g\\+\\+"):
        require_linker(PRESETS["x86"])
    tools = {status.tool: status for status in required_tools(PRESETS["cuda"])}
    assert set(tools) == {"g++", "nvcc"}
    assert not any(status.found for status in tools.values())


def test_compile_without_cross_compiler_fails_before_building(monkeypatch, tmp_path):
    """The toolchain is checked before the (slow) build, and nothing is written."""
    import edgec.build

    def no_build(*args, **kwargs):
        raise AssertionError("build must not start without a linker")

    monkeypatch.setattr(edgec.build, "build", no_build)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    model = _tiny_model()
    output = tmp_path / "out"
    with pytest.raises(ToolchainError, match="aarch64-linux-gnu"):
        edgec.compile(model, "cortex-a53", output)
    assert list(tmp_path.iterdir()) == []


def _tiny_model():
    import onnx_ir as ir

    x = ir.Value(name="x", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Relu", [x], num_outputs=1)
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 17}, name="tiny")
    return edgec.from_onnx_ir(ir.Model(graph, ir_version=8))


def test_local_runner_refuses_cross_artifacts(tmp_path):
    from edgec.core.artifact import Artifact
    from edgec.runtimes.local import LocalRunner

    manifest = {"target": {"preset": "cortex-a7", "host_runnable": False}}
    with pytest.raises(ArtifactError, match="cortex-a7"):
        LocalRunner(Artifact(tmp_path, manifest))


ARMV7_KERNEL = """
    .syntax unified
    .arm
    .text
    .globl kernel
    .type kernel, %function
kernel:
"""
ARMV7_PLT_CALL_OVER_BIG_RODATA = ARMV7_KERNEL + """    push {lr}
    bl memset(PLT)
    pop {pc}
    .section .note.GNU-stack,"",%progbits
    .section .rodata
weights:
    .space 300000000
"""


def test_armv7_links_a_library_with_weights_over_256_mb(tmp_path):
    """ResNet-152 and Wide ResNet-50 for cortex-a7 failed to link (BFD ld "assertion fail
    elf32-arm.c:9885"): their weights, in lib.so's .rodata, put the GOT out of the short PLT
    entries' reach. The preset links with --long-plt; without it the same object fails."""
    from edgec.targets import linker

    preset = PRESETS["cortex-a7"]
    assembler = "arm-linux-gnueabihf-as"
    if shutil.which(assembler) is None or shutil.which(preset.toolchain.compiler) is None:
        pytest.skip("the armv7 cross toolchain is not installed (make setup installs it)")
    source = tmp_path / "big.s"
    source.write_text(ARMV7_PLT_CALL_OVER_BIG_RODATA)
    import subprocess

    subprocess.run([assembler, "-o", str(tmp_path / "big.o"), str(source)], check=True)
    assert "-Wl,--long-plt" in preset.toolchain.link_options
    linker(preset)(str(tmp_path / "lib.so"), [str(tmp_path / "big.o")])
    assert (tmp_path / "lib.so").stat().st_size > 300_000_000
    (tmp_path / "lib.so").unlink()
    short = dataclasses.replace(preset, toolchain=dataclasses.replace(preset.toolchain, link_options=()))
    try:
        with pytest.raises(RuntimeError, match="elf32-arm|PLT") as error:
            linker(short)(str(tmp_path / "short.so"), [str(tmp_path / "big.o")])
    finally:  # 300 MB each: not left in pytest's kept temporary directories
        for name in ("big.o", "short.so"):
            (tmp_path / name).unlink(missing_ok=True)
    from edgec.build import _linker_message

    message = _linker_message(error.value)  # what `edgec compile` says: the diagnostic first, once
    assert "\n" not in message and message.split(";")[0].rstrip().endswith(("elf32-arm.c:9885", "--long-plt"))
    assert message.count("assertion fail") <= 1 and message.rstrip().split("; ")[-1].startswith("Command line:")


ARMV7_FUNCTION_WITH_UNWIND_ENTRY = ARMV7_KERNEL + """    .fnstart
    .cantunwind
    bx lr
    .fnend
    .section .note.GNU-stack,"",%progbits
"""


def test_armv7_links_without_the_unwind_index(tmp_path):
    """ViT-L/16 for cortex-a7 failed to link ("relocation truncated to fit: R_ARM_PREL31 against
    .text"): the unwind index after its 1.2 GB of weights could not reach the code. The preset
    strips .ARM.exidx from the objects before linking: an object with an unwind entry links into
    a lib.so without the section; linked as it is, the section is there."""
    import subprocess

    from edgec.targets import linker

    preset = PRESETS["cortex-a7"]
    tools = ("arm-linux-gnueabihf-as", "arm-linux-gnueabihf-readelf", preset.toolchain.compiler)
    if any(shutil.which(tool) is None for tool in tools):
        pytest.skip("the armv7 cross toolchain is not installed (make setup installs it)")
    source = tmp_path / "kernel.s"
    source.write_text(ARMV7_FUNCTION_WITH_UNWIND_ENTRY)

    def sections(link) -> str:
        subprocess.run([tools[0], "-o", str(tmp_path / "kernel.o"), str(source)], check=True)
        link(str(tmp_path / "lib.so"), [str(tmp_path / "kernel.o")])
        return subprocess.run([tools[1], "-S", str(tmp_path / "lib.so")], capture_output=True, text=True, check=True).stdout

    kept = dataclasses.replace(preset, toolchain=dataclasses.replace(preset.toolchain, strip_sections=()))
    assert ".ARM.exidx" in sections(linker(kept))
    assert ".ARM.exidx" not in sections(linker(preset))
