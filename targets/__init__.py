"""Compilation targets: presets as data, resolution to TVM target JSON, toolchains."""

from edgec.targets.presets import PRESETS, TargetPreset, Toolchain
from edgec.targets.resolve import ResolvedTarget, resolve
from edgec.targets.toolchain import ToolStatus, linker, require_linker, required_tools

__all__ = [
    "PRESETS",
    "ResolvedTarget",
    "TargetPreset",
    "ToolStatus",
    "Toolchain",
    "linker",
    "require_linker",
    "required_tools",
    "resolve",
]
