"""Turn a target spec (``cortex-a7``, ``cuda:arch=sm_86``) into TVM target JSON."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from edgec.errors import TargetError
from edgec.targets.host import host_cpu_name
from edgec.targets.presets import PRESETS, TargetPreset

_CUDA_ARCH = re.compile(r"^sm_\d{2,3}[a-z]?$")


@dataclasses.dataclass(frozen=True)
class ResolvedTarget:
    """A preset with its options filled in and the TVM target JSON it means."""

    preset: TargetPreset
    options: dict[str, str]
    tvm_json: dict[str, Any]
    host_json: dict[str, Any] | None

    @property
    def name(self) -> str:
        return self.preset.name

    @property
    def spec(self) -> str:
        """The spec string that reproduces this target."""
        if not self.options:
            return self.preset.name
        opts = ",".join(f"{key}={value}" for key, value in sorted(self.options.items()))
        return f"{self.preset.name}:{opts}"

    def tvm_target(self):
        import tvm

        if self.host_json is None:
            return tvm.target.Target(self.tvm_json)
        return tvm.target.Target(self.tvm_json, host=self.host_json)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"cuda:arch=sm_86"`` -> ``("cuda", {"arch": "sm_86"})``."""
    name, _, rest = spec.strip().partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise TargetError(f"bad target option {item!r} in {spec!r}: write it as key=value, e.g. cuda:arch=sm_86")
        options[key.strip()] = value.strip()
    return name.strip(), options


def llvm_json(preset: TargetPreset, num_cores: int | None = None) -> dict[str, Any]:
    """TVM LLVM target JSON for the CPU side of ``preset``."""
    target: dict[str, Any] = {"kind": "llvm"}
    if preset.mtriple:
        target["mtriple"] = preset.mtriple
    target["mcpu"] = preset.mcpu or host_cpu_name()
    if preset.mattr:
        target["mattr"] = list(preset.mattr)
    if preset.float_abi:
        target["mfloat-abi"] = preset.float_abi
    if num_cores:
        target["num-cores"] = num_cores
    return target


def resolve(spec: str | ResolvedTarget) -> ResolvedTarget:
    """Resolve a target spec; a TargetError lists the presets when the name is unknown."""
    if isinstance(spec, ResolvedTarget):
        return spec
    name, given = parse_spec(spec)
    preset = PRESETS.get(name)
    if preset is None:
        raise TargetError(f"unknown target {name!r}; choose one of: {', '.join(PRESETS)} (see `edgec targets`)")
    defaults = dict(preset.options)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) or "none"
        raise TargetError(f"target {name!r} has no option {', '.join(unknown)}; its options are: {valid}")
    options = {**defaults, **given}
    if preset.kind == "cuda":
        if not _CUDA_ARCH.match(options["arch"]):
            raise TargetError(f"bad CUDA arch {options['arch']!r}: expected sm_XY, e.g. sm_80 (A100), sm_90 (H100)")
        return ResolvedTarget(preset, options, {"kind": "cuda", "arch": options["arch"]}, llvm_json(preset))
    return ResolvedTarget(preset, options, llvm_json(preset), None)


def physical_cores() -> int:
    """Physical CPU cores of this machine: the default thread count of edgec's kernels.

    TVM's own default is logical CPUs / 2 on x86 (it assumes hyper-threading),
    which is one thread on a 2-core VM without SMT.
    """
    import os

    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable
        cores = None
    return max(1, cores or os.cpu_count() or 1)
