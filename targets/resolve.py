"""Turn a target spec (``cortex-a7``, ``cuda:arch=sm_86``) into TVM target JSON."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from edgec.core.errors import TargetError
from edgec.targets.host import host_cpu_name
from edgec.targets.presets import PRESETS, TargetPreset

_CUDA_ARCH = re.compile(r"^sm_\d{2,3}[a-z]?$")
CUDA_DTYPES = ("float32", "float16")

# ``cuda:dtype=float16``: convolutions and matmuls read float16 operands and accumulate in
# float32 (TVM's ToMixedPrecision); the rest stays float32. Built for this CPU from the
# same graph (seeded weights, 3 inputs each), MobileNetV2's outputs needed rtol=atol of
# 1.0e-2 to 1.2e-2 against float32 and ResNet-18's 1.9e-3 to 2.3e-3: checks of float16
# builds use at least this tolerance.
FLOAT16_TOLERANCE = 5e-2


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
    def dtype(self) -> str:
        """The compute dtype of convolutions and matmuls (``cuda:dtype=float16``); float32 elsewhere."""
        return self.options.get("dtype", "float32")

    @property
    def min_tolerance(self) -> float:
        """The smallest rtol/atol that output checks of this build use (float16 is lossy)."""
        return FLOAT16_TOLERANCE if self.dtype == "float16" else 0.0

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
        if options["dtype"] not in CUDA_DTYPES:
            raise TargetError(f"bad CUDA dtype {options['dtype']!r}: choose one of {', '.join(CUDA_DTYPES)}")
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
