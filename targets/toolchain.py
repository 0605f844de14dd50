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
    """The ``fcompile`` that links ``lib.so`` for ``preset``: its compiler (the host's default
    without a toolchain) with the toolchain's link options, ``strip_sections`` removed from the
    objects, and on CPU targets edgec's thread pool linked in (targets/thread_pool.py). ``None``
    for a CUDA target without a toolchain (TVM's default link); a ToolchainError when the
    compiler is missing."""
    compiler = require_linker(preset)
    chain = preset.toolchain
    if preset.kind == "cuda" and chain is None:
        return None
    from tvm.support import cc

    from edgec.targets.thread_pool import with_thread_pool

    def link(output, objects, options=None):
        """TVM's create_shared, after ``strip_sections`` are removed from the object files."""
        if chain is not None and chain.strip_sections:
            objcopy = f"{chain.compiler.rsplit('-', 1)[0]}-objcopy"
            removals = [f"--remove-section={section}" for section in chain.strip_sections]
            for path in objects:
                if str(path).endswith(".o"):  # export_library's own objects, in its temporary directory
                    run_tool([objcopy, *removals, str(path)], f"removing {', '.join(chain.strip_sections)} from {path}")
        cc.create_shared(output, objects, options=options, cc=compiler)

    driver = compiler or cc.get_cc()
    if preset.kind != "cuda":
        link = with_thread_pool(link, driver)
    options = list(chain.link_options) if chain is not None else []
    # export_library asks it for the triple when no LLVM module names one
    return cc.cross_compiler(link, options=options, get_target_triple=cc.get_target_by_dump_machine(driver))


def run_tool(command: list[str], what: str) -> None:
    """Run a binutils ``command``; a ToolchainError naming ``what`` failed when it does."""
    import subprocess

    if shutil.which(command[0]) is None:
        raise ToolchainError(f"{what} needs {command[0]!r}, which is not on PATH; it comes with the cross compiler's binutils")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise ToolchainError(f"{what} failed: {done.stderr.strip() or done.stdout.strip()}")
