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

    return cc.cross_compiler(compiler, options=list(preset.toolchain.link_options))
