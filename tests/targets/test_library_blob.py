"""lib.so's serialized modules (VM executable, weights) are linked in from a file with .incbin:
the same bytes TVM's own packing writes, under the same symbol, where each architecture wants
them; the libraries load and run (x86 here; ARM builds verify on the emulated boards in
tests/test_verify.py and tests/test_emulated_boards.py)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

import edgec
from edgec.targets import PRESETS
from edgec.targets.library_blob import SYMBOL, assembly, packer


def _symbol(nm: str, lib) -> tuple[str, int]:
    """(section letter, size) of SYMBOL in ``lib``'s dynamic symbols."""
    listing = subprocess.run([nm, "-D", "-S", str(lib)], capture_output=True, text=True, check=True).stdout
    (line,) = [line for line in listing.splitlines() if line.endswith(SYMBOL)]
    _, size, letter, _ = line.split()
    return letter, int(size, 16)


def _sections(readelf: str, lib) -> list[str]:
    """``lib``'s section names in address order."""
    listing = subprocess.run([readelf, "-SW", str(lib)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"^\s*\[\s*\d+\]\s+(\S+)", listing, flags=re.MULTILINE)


def _blob(executable) -> bytes:
    import tvm

    return tvm.get_global_func("runtime.ModulePackImportsToTensor")(executable.mod).numpy().tobytes()


@pytest.fixture(scope="module")
def mlp_executable(saved_models):
    from edgec.build import BuildOptions, build
    from edgec.lower import to_relax
    from edgec.core.fallbacks import FallbackLog
    from edgec.targets import resolve

    def executable(target: str):
        resolved = resolve(target)
        model = edgec.load(saved_models["mlp"].files["onnx"])
        return resolved, build(to_relax(model.graph, resolved), resolved, BuildOptions(), FallbackLog()).executable

    return executable


def test_x86_blob_is_large_data_and_runs(mlp_executable, saved_models, tmp_path):
    import tvm
    from tvm import relax

    from edgec.build import export

    target, executable = mlp_executable("x86")
    export(executable, target, tmp_path)
    lib = tmp_path / "lib.so"
    names = _sections("readelf", lib)
    assert ".lrodata" in names and names.index(".lrodata") > names.index(".data")  # no 32-bit offset from the code crosses it
    assert _symbol("nm", lib) == ("R", len(_blob(executable)))
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    saved = saved_models["mlp"]
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(saved.example)).numpy(), saved.torch_outputs(saved.example), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["cortex-a53", "cortex-a7"])
def test_arm_blob_links_with_the_cross_toolchain(mlp_executable, target, tmp_path):
    from edgec.build import export

    nm = PRESETS[target].toolchain.compiler.rsplit("-", 1)[0] + "-nm"
    if shutil.which(nm) is None:
        pytest.skip(f"{nm} is not installed (make setup installs the cross toolchains)")
    resolved, executable = mlp_executable(target)
    export(executable, resolved, tmp_path)
    letter, size = _symbol(nm, tmp_path / "lib.so")
    assert size == len(_blob(executable))
    if target == "cortex-a53":  # after .eh_frame, whose 32-bit offsets to the code must not cross 2 GB of weights
        assert letter == "D"  # a (relocation-read-only) data section
        names = _sections(nm.replace("-nm", "-readelf"), tmp_path / "lib.so")
        assert names.index(".data.rel.ro") > names.index(".eh_frame")
    else:
        assert letter == "R"


def test_assembly_per_architecture(tmp_path):
    blob = tmp_path / "blob.bin"
    for arch, flag in (("x86_64", "@progbits"), ("aarch64", "%progbits"), ("armv7", "%progbits")):
        text = assembly(blob, arch)
        assert f".globl {SYMBOL}" in text and f'.incbin "{blob}"' in text and text.splitlines()[0].endswith(flag)
    assert packer("riscv64") is None


def test_system_libraries_keep_tvm_packing(tmp_path):
    with pytest.raises(ValueError, match="system-lib"):
        packer("x86_64")(None, True, "", str(tmp_path))
