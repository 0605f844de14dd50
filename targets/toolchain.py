"""Find the compilers a target needs, or say exactly what to install."""

from __future__ import annotations

import dataclasses
import shutil

from edgec.core.errors import ToolchainError
from edgec.targets.presets import TargetPreset


@dataclasses.dataclass(frozen=True)
class ToolStatus:
    """One tool a target needs, and where (or whether) it was found."""

    tool: str
    path: str | None
    install_hint: str

    @property
    def found(self) -> bool:
        return self.path is not None


def required_tools(preset: TargetPreset) -> list[ToolStatus]:
    """The compilers ``edgec compile`` will call for ``preset``."""
    tools = []
    if preset.toolchain is not None:
        chain = preset.toolchain
        tools.append(
            ToolStatus(chain.compiler, shutil.which(chain.compiler), f"apt-get install {chain.debian_package}")
        )
    else:
        tools.append(ToolStatus("g++", shutil.which("g++"), "apt-get install g++"))
    if preset.kind == "cuda":
        tools.append(
            ToolStatus(
                "nvcc",
                shutil.which("nvcc"),
                "install the CUDA toolkit (nvcc) to check that generated kernels compile",
            )
        )
    return tools


def require_linker(preset: TargetPreset) -> str | None:
    """The cross compiler for ``preset`` (``None``: the host's default), or a ToolchainError."""
    if preset.toolchain is None:
        if shutil.which("g++") is None:
            raise ToolchainError("no host C++ compiler 'g++' on PATH to link lib.so; install it with: apt-get install g++")
        return None
    chain = preset.toolchain
    path = shutil.which(chain.compiler)
    if path is None:
        raise ToolchainError(
            f"target {preset.name!r} needs the cross compiler {chain.compiler!r}, which is not on PATH; "
            f"install it with: sudo apt-get install {chain.debian_package}"
        )
    return path


def linker(preset: TargetPreset):
    """The ``fcompile`` that links ``lib.so`` for ``preset`` (TVM's ``cc.cross_compiler`` of its
    compiler with the toolchain's link options), ``None`` for the host's default; a ToolchainError
    when the compiler is missing."""
    compiler = require_linker(preset)
    if compiler is None:
        return None
    from tvm.support import cc

    chain = preset.toolchain
    if not chain.strip_sections:
        return cc.cross_compiler(compiler, options=list(chain.link_options))
    objcopy = f"{chain.compiler.rsplit('-', 1)[0]}-objcopy"

    def link(output, objects, options=None):
        """TVM's create_shared, after ``strip_sections`` are removed from the object files."""
        removals = [f"--remove-section={section}" for section in chain.strip_sections]
        for path in objects:
            if str(path).endswith(".o"):  # export_library's own objects, in its temporary directory
                run_tool([objcopy, *removals, str(path)], f"removing {', '.join(chain.strip_sections)} from {path}")
        cc.create_shared(output, objects, options=options, cc=compiler)

    return cc.cross_compiler(link, options=list(chain.link_options))


def run_tool(command: list[str], what: str) -> None:
    """Run a binutils ``command``; a ToolchainError naming ``what`` failed when it does."""
    import subprocess

    if shutil.which(command[0]) is None:
        raise ToolchainError(f"{what} needs {command[0]!r}, which is not on PATH; it comes with the cross compiler's binutils")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise ToolchainError(f"{what} failed: {done.stderr.strip() or done.stdout.strip()}")
