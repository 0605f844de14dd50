"""Target presets: boards and GPUs as data.

Each preset is a frozen dataclass; the registry maps a name to it. Nothing in
edgec branches on a target's name: code reads the fields below.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Arch = Literal["x86_64", "armv7", "aarch64", "cuda"]


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """A C++ compiler used to link ``lib.so``, the Debian package that ships it, and the options
    the link needs."""

    compiler: str
    debian_package: str
    link_options: tuple[str, ...] = ()
    # sections removed from the objects before they are linked (binutils' objcopy of the same prefix)
    strip_sections: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TargetPreset:
    """One compilation target.

    ``llvm`` holds the TVM LLVM target fields (``mtriple``, ``mcpu``, ``mattr``,
    ...) of the code that runs on the CPU; for CUDA it is the host part. ``mcpu``
    ``None`` means "the CPU of the machine compiling" (LLVM rejects "native").
    ``options`` are the user-settable options with their defaults
    (``--target cuda:arch=sm_86,dtype=float16``). ``vector_lanes`` (float32 lanes of one
    SIMD register) and ``vector_registers`` shape the CPU schedule library's
    tiles; ``None`` means "detect the compiling machine" (AVX-512: 16 and 32,
    AVX2: 8 and 16). ``winograd_min_tiles``: a 3x3 convolution becomes a
    Winograd one when it has at least this many output tiles; ``winograd_tiles``: the
    output tiles m of F(m x m, 3x3) tried; ``winograd_transform_cost``: None, the first
    of them with enough tiles, else the one of fewest estimated multiply-adds, a
    transform term costing this many (WinogradPolicy).
    ``emulated_cpu``: the CPU qemu-user emulates for this preset's board (``-cpu``); ``None``:
    ``mcpu`` (QEMU 7.2 knows cortex-a7, -a53, -a72, -a76, not -a55).
    """

    name: str
    description: str
    kind: Literal["llvm", "cuda"]
    arch: Arch
    cpu_arch: Literal["x86_64", "armv7", "aarch64"]
    mtriple: str | None
    mcpu: str | None
    mattr: tuple[str, ...] = ()
    float_abi: str | None = None
    toolchain: Toolchain | None = None
    host_runnable: bool = False
    elf_machine: str = ""
    elf_bits: Literal[32, 64] = 64
    options: tuple[tuple[str, str], ...] = ()
    vector_lanes: int | None = None
    vector_registers: int | None = None
    winograd_min_tiles: int = 49
    winograd_tiles: tuple[int, ...] = (4, 2)
    winograd_transform_cost: float | None = None
    emulated_cpu: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("llvm", "cuda"):
            raise ValueError(f"preset {self.name!r}: kind must be 'llvm' or 'cuda', not {self.kind!r}")
        if self.elf_bits not in (32, 64):
            raise ValueError(f"preset {self.name!r}: elf_bits must be 32 or 64")
        for field in ("vector_lanes", "vector_registers"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"preset {self.name!r}: {field} must be a positive int or None")


ARM_WINOGRAD_TILES = (6, 5, 4, 3, 2)  # aarch64: the cheapest by WinogradPolicy's estimate

# fmt: off
PRESETS: dict[str, TargetPreset] = {p.name: p for p in (
    TargetPreset(
        name="x86", description="this x86-64 machine (CPU detected, AVX2/AVX-512 as it has)",
        kind="llvm", arch="x86_64", cpu_arch="x86_64", mtriple=None, mcpu=None,
        toolchain=None, host_runnable=True, elf_machine="x86-64", elf_bits=64,
    ),
    TargetPreset(
        name="cortex-a7", description="ARM Cortex-A7, 32-bit armv7-a, NEON + VFPv4, hard float (Raspberry Pi 2)",
        kind="llvm", arch="armv7", cpu_arch="armv7", mtriple="armv7a-linux-gnueabihf", mcpu="cortex-a7",
        # -slowfpvfmx: LLVM's cortex-a7 model marks VFMA slow and splits every multiply-add into
        # vmul.f32 + vadd.f32; fused, one instruction per 4 MACs, as on aarch64 (README "Instruction counts")
        mattr=("+neon", "+vfp4", "-slowfpvfmx"), float_abi="hard",
        # --long-plt: a model's weights (lib.so's .rodata) lie between the PLT and the GOT; from about
        # 256 MB on (ResNet-152, Wide ResNet-50) the short PLT entries cannot reach the GOT and BFD ld
        # failed with "assertion fail elf32-arm.c:9885" (gold: "PLT offset too large")
        # strip_sections: the EHABI unwind index (.ARM.exidx, an R_ARM_PREL31 offset to each function,
        # +-1 GiB) lies after .rodata; over 1 GiB of weights (ViT-L/16, 1.2 GB) and it cannot reach
        # .text ("relocation truncated to fit: R_ARM_PREL31"). Kernels never unwind: an error is a
        # return code through TVM's C ABI, so the index and its tables go
        toolchain=Toolchain("arm-linux-gnueabihf-g++", "g++-arm-linux-gnueabihf", link_options=("-Wl,--long-plt",),
                            strip_sections=(".ARM.exidx*", ".rel.ARM.exidx*", ".ARM.extab*", ".rel.ARM.extab*")),
        elf_machine="ARM", elf_bits=32, vector_lanes=4, vector_registers=16,
    ),
    TargetPreset(
        name="cortex-a53", description="ARM Cortex-A53, 64-bit aarch64, NEON (Raspberry Pi 3, many SBCs)",
        kind="llvm", arch="aarch64", cpu_arch="aarch64", mtriple="aarch64-linux-gnu", mcpu="cortex-a53",
        mattr=("+neon",), toolchain=Toolchain("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
        elf_machine="AArch64", elf_bits=64, vector_lanes=4, vector_registers=32,
        # instruction counts (README, Winograd): F(5x5) at 14x14, F(4x4) at 7x7 (4 tiles); a transform
        # term (measured: 0.48-0.64 instructions per term and channel, F(4x4) to F(6x6)) costs ~2 GEMM
        # multiply-adds (0.3 instructions each: a 4-lane fmla, 1.2-1.3 instructions)
        winograd_min_tiles=4, winograd_tiles=ARM_WINOGRAD_TILES, winograd_transform_cost=2.0,
    ),
    TargetPreset(
        name="cortex-a55", description="ARM Cortex-A55, 64-bit armv8.2-a, NEON + dot product (udot/sdot; Rockchip RK3566/RK3568, Amlogic S905X3)",
        kind="llvm", arch="aarch64", cpu_arch="aarch64", mtriple="aarch64-linux-gnu", mcpu="cortex-a55",
        mattr=("+neon", "+dotprod"), toolchain=Toolchain("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
        elf_machine="AArch64", elf_bits=64, vector_lanes=4, vector_registers=32,
        # as cortex-a53: the same in-order NEON pipeline
        winograd_min_tiles=4, winograd_tiles=ARM_WINOGRAD_TILES, winograd_transform_cost=2.0,
        # QEMU 7.2 has no cortex-a55; cortex-a76 is armv8.2-a with the same dot product (FEAT_DotProd)
        emulated_cpu="cortex-a76",
    ),
    TargetPreset(
        name="cortex-a72", description="ARM Cortex-A72, 64-bit aarch64, NEON (Raspberry Pi 4)",
        kind="llvm", arch="aarch64", cpu_arch="aarch64", mtriple="aarch64-linux-gnu", mcpu="cortex-a72",
        mattr=("+neon",), toolchain=Toolchain("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
        elf_machine="AArch64", elf_bits=64, vector_lanes=4, vector_registers=32,
        # instruction counts (README, Winograd): F(5x5) at 14x14, F(4x4) at 7x7 (4 tiles); a transform
        # term (measured: 0.48-0.64 instructions per term and channel, F(4x4) to F(6x6)) costs ~2 GEMM
        # multiply-adds (0.3 instructions each: a 4-lane fmla, 1.2-1.3 instructions)
        winograd_min_tiles=4, winograd_tiles=ARM_WINOGRAD_TILES, winograd_transform_cost=2.0,
    ),
    TargetPreset(
        name="cuda", description="NVIDIA GPU via CUDA, TVM dlight default GPU schedules (host code generic x86-64)",
        # the host part (the VM's glue, kernel launches) runs on whatever x86-64 CPU the GPU server has
        kind="cuda", arch="cuda", cpu_arch="x86_64", mtriple=None, mcpu="x86-64",
        toolchain=None, elf_machine="x86-64", elf_bits=64,
        options=(("arch", "sm_80"), ("dtype", "float32")),
    ),
)}
# fmt: on
