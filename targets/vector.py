"""The CPU's vectors as the kernels see them: one description for the schedule
library (targets/schedules) and the custom-op kernels (edgec/ops).

One rule per fact:

- float32 lanes: the preset's ``vector_lanes``; else NEON 4 (armv7, aarch64);
  else the x86 CPU features LLVM reports for the target's ``mcpu``: AVX-512F
  16, AVX or AVX2 8, SSE 4.
- integer vectors (the bit kernels' words): as wide as the float ones, except
  on an AVX CPU without AVX2, whose 256-bit registers have no integer ops
  (128 bits there).
- registers: the preset's ``vector_registers``; else NEON 16 quad registers
  on armv7, 32 on aarch64; x86 32 with AVX-512F, else 16.
- general-purpose word: 32 bits on armv7, 64 elsewhere.
- popcount: how LLVM counts the bits of a vector on this CPU (AVX-512
  VPOPCNTDQ ``vpopcntq``, else a ``vpshufb`` nibble table; NEON ``cnt``).
- accumulators: what a register tile may hold is the register file less a
  quarter of it for loads, broadcasts and temporaries, or less the kernel's
  own count of such operands when that is larger (``operands``, 4 for a float
  FMA tile: 32 registers -> 24, 16 -> 12; the popcount tile needs 6: 16 -> 10).
- a vectorised loop covers at most 4 registers' worth (``vectorize_innermost``).
- lane multiply-add: whether one multiply-add can take a lane of a vector
  register as its scalar operand (aarch64 NEON ``fmla v0.4s, v1.4s, v2.s[3]``).
  Then a contraction loads ``lanes`` consecutive values of its broadcast operand
  with one vector load instead of one load per value (``common.lane_broadcast``).
  aarch64 only: x86 folds a broadcast load into the FMA itself, and armv7's
  multiply-by-scalar forms are not fused (LLVM splits them on cortex-a7).
- int8 dot product: whether one instruction multiplies 4 uint8 by 4 int8 and adds
  the 4 products into an int32 lane (x86 AVX-512 VNNI ``vpdpbusd``, 64 MACs per
  zmm instruction): the int8 convolutions then take ``conv2d_int8``'s kernel.
- maximum of numbers: whether one vector instruction takes IEEE maxNum (the number when
  one side is NaN; aarch64 ``fmaxnm``): a max pool then maxes with it (LLVM ``maxnum``)
  instead of TVM's ``a > b ? a : b`` (``fcmgt`` + ``bsl`` + a copy). Not x86, where
  ``vmaxps`` is that select in one instruction and ``maxnum`` adds a NaN fix-up, nor armv7
  (``vmax.f32`` propagates NaN; ``vmaxnm`` is ARMv8).
- dot product (aarch64): 4-way int8 dot products into int32 lanes (aarch64 ``sdot``/``udot``,
  armv8.2-a FEAT_DotProd): the preset's ``mattr`` holds ``+dotprod``.
- packed matrix-vector weights (x86): a matrix-vector product's constant weights (a classifier
  at batch 1, a squeeze-excite block's 1x1 convolutions on one pixel, 1x1 convolutions with more
  weight than input bytes) are packed by its register
  tile's columns, one contiguous run per tile (targets/schedules/packed_matvec.py). x86 only,
  where it was measured; the ARM targets keep their weights as they were.

``None`` as the target means this machine (x86, its CPU detected).
"""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)

# NEON per CPU architecture: (general-purpose word bits, vector registers, how bits are counted, lane FMA)
# (aarch64's lane FMA and fmaxnm go together here; two names for two uses)
_NEON = {"armv7": (32, 16, "NEON vcnt.8 + vpaddl", False), "aarch64": (64, 32, "NEON cnt + uaddlp", True)}


@dataclasses.dataclass(frozen=True)
class CpuVector:
    """The SIMD shape kernels tile for.

    ``lanes``: float32 lanes of one vector register (AVX-512 16, AVX2 8, NEON
    4). ``registers``: architectural vector registers. ``integer_bits``: width
    of integer vector operations (``None``: as the float ones, ``lanes * 32``).
    ``word_bits``: the general-purpose register, the bit kernels' word.
    ``popcount``: how the CPU counts bits in a vector, as LLVM emits it (for the
    log and the reader of a manifest). ``lane_fma``: a multiply-add can read one
    lane of a vector register as its scalar operand (module docstring).
    ``int8_dot``: a 4-way uint8 x int8 -> int32 dot product per lane (VNNI).
    ``dot_product``: ``sdot`` (module docstring). ``pair_product``: aarch64 without it, whose int8
    convolutions multiply int8 pairs into int16 (``smull``/``smlal2``/``sadalp``, conv2d_pair.py).
    ``max_number``: a vector maxNum
    instruction (module docstring). ``packed_matvec``: matrix-vector products read packed
    weights (module docstring).
    """

    lanes: int
    registers: int
    integer_bits: int | None = None
    word_bits: int = 64
    popcount: str = "scalar popcnt"
    lane_fma: bool = False
    int8_dot: bool = False
    dot_product: bool = False
    max_number: bool = False
    pair_product: bool = False
    packed_matvec: bool = False

    @property
    def word_dtype(self) -> str:
        """The general-purpose word as an unsigned TIR dtype (``uint64``, ``uint32``)."""
        return f"uint{self.word_bits}"

    @property
    def bits(self) -> int:
        """Width of a float vector register."""
        return self.lanes * 32

    def lanes_of(self, dtype: str) -> int:
        """Lanes of one vector register for ``dtype`` (``float32``, ``uint64``, ...)."""
        width = int("".join(ch for ch in dtype if ch.isdigit()))
        integer = dtype.startswith(("int", "uint"))
        return max(1, ((self.integer_bits or self.bits) if integer else self.bits) // width)

    def accumulator_budget(self, operands: int = 4) -> int:
        """Vector registers a register tile may hold: the file less ``max(operands, registers / 4)``."""
        return self.registers - max(operands, self.registers // 4)

    @property
    def accumulators(self) -> int:
        """The budget of a float FMA tile (a weight vector and broadcast inputs beside it)."""
        return self.accumulator_budget()


def cpu_vector(target) -> CpuVector:
    """The :class:`CpuVector` of a ResolvedTarget's CPU (its host CPU for CUDA; ``None``: this machine)."""
    preset = getattr(target, "preset", None)
    arch = getattr(preset, "cpu_arch", "x86_64")
    lanes = getattr(preset, "vector_lanes", None)
    registers = getattr(preset, "vector_registers", None)
    if arch in _NEON:
        word_bits, neon_registers, popcount, lane_fma = _NEON[arch]
        dot_product = "+dotprod" in getattr(preset, "mattr", ())
        return CpuVector(
            lanes or 4, registers or neon_registers, None, word_bits, popcount, lane_fma,
            dot_product=dot_product, max_number=arch == "aarch64", pair_product=arch == "aarch64" and not dot_product,
        )
    features = _x86_features(target)
    if "avx512f" in features:
        detected, integer_bits = 16, 512
    elif "avx2" in features:
        detected, integer_bits = 8, 256
    elif "avx" in features:
        detected, integer_bits = 8, 128
    else:
        detected, integer_bits = 4, 128
    lanes = lanes or detected
    if getattr(preset, "vector_lanes", None):
        integer_bits = lanes * 32
    registers = registers or (32 if "avx512f" in features else 16)
    int8_dot = integer_bits == 512 and {"avx512vnni", "avx512vl"} <= features  # VL: the 8-lane (ymm) form
    return CpuVector(
        lanes, registers, integer_bits, 64, _x86_popcount(features, integer_bits), int8_dot=int8_dot, packed_matvec=True,
    )


def _x86_popcount(features: set[str], integer_bits: int) -> str:
    if integer_bits == 512:
        return "AVX-512 vpopcntq" if "avx512vpopcntdq" in features else "AVX-512BW vpshufb nibble table"
    if integer_bits == 256:
        return "AVX2 vpshufb nibble table"
    return "SSE pshufb nibble table" if "ssse3" in features else "scalar popcnt"


def _x86_features(target) -> set[str]:
    """The CPU features LLVM reports for the target's (host) mcpu; empty (SSE) when it cannot tell."""
    import tvm
    from tvm.target import codegen

    if target is None:
        from edgec.targets.host import host_cpu_name

        spec = {"kind": "llvm", "mcpu": host_cpu_name()}
    else:
        spec = dict(target.host_json or target.tvm_json)
    try:
        return set(codegen.llvm_get_cpu_features(tvm.target.Target(spec)))
    except Exception as error:  # noqa: BLE001 - an FFI error type varies by build
        log.warning("could not read the CPU features of %s (%s): assuming SSE, 4 float lanes", spec.get("mcpu"), error)
        return set()


def vectorize_innermost(sch, loop, lanes: int) -> None:
    """Vectorise ``loop`` when it is at most 4 registers' worth, else split off and vectorise
    the largest of 4, 2 or 1 registers' worth that divides it (none: left scalar)."""
    extent = int(sch.get(loop).extent)
    if extent <= 4 * lanes:
        if extent > 1:
            sch.vectorize(loop)
        return
    for width in (4 * lanes, 2 * lanes, lanes):
        if extent % width == 0:
            _, inner = sch.split(loop, [None, width])
            sch.vectorize(inner)
            return
