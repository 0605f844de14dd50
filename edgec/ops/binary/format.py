"""The bit format of coded weights: 1-bit (binary) and 2-bit (ternary) layers.

The weight of output channel ``o`` is ``scale[o] * u`` with a unit weight
``u`` read from one or more bit planes by a :class:`WeightCode`. Binary
weights are one plane: ``encoding="sign"`` (XNOR-Net, RBNN, ReCU) reads a bit
of 1 as ``u = -1`` and 0 as ``u = +1``; ``encoding="magnitude"`` (SiMaN)
reads 1 as ``u = 1`` and 0 as ``u = 0`` (ternary's two planes:
edgec/ops/ternary/format.py). The bits are stored little-endian along the
input channels, 8 to a byte (bit ``c % 8`` of byte ``c // 8``; the unused
bits of the last byte are 0)::

    BinaryConv  weight_bits  uint8 (C_out, kh, kw, ceil(C_in / group / 8))
    BinaryGemm  weight_bits  uint8 (N, ceil(K / 8))      (the unit weight of B^T)
    both        scale        float32 (C_out,)  /  (N,)
                bias         float32 (C_out,)  /  (N,)   optional

so a float32 weight takes 32x less room (plus one scale per channel).

Two re-packings serve the kernels (edgec/ops/binary/kernels.py): the
popcount kernel reads sign bits in words of ``word_bits`` (:func:`weight_words`),
the run-time decode reads bits packed along the output channels
(:func:`decode_bits`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CODES",
    "ENCODINGS",
    "WeightCode",
    "binary_code",
    "decode_bits",
    "float_weight_hwio",
    "pack_bits",
    "unit_weights",
    "unpack_bits",
    "weight_words",
]


@dataclasses.dataclass(frozen=True)
class WeightCode:
    """How bit planes read as unit weights.

    ``unit(bits)`` maps one 0/1 value per plane (NumPy float arrays, or float32
    TIR expressions in the decode kernel) to ``u``; ``name`` names the run-time
    decode kernel (``edgec_{name}_decode``).
    """

    name: str
    planes: int
    unit: Callable[[Sequence[Any]], Any]


CODES = {
    "sign": WeightCode("binary", 1, lambda bits: 1.0 - 2.0 * bits[0]),
    "magnitude": WeightCode("binary", 1, lambda bits: bits[0]),
}
ENCODINGS = tuple(CODES)


def binary_code(encoding: str) -> WeightCode:
    """The :class:`WeightCode` of a binary ``encoding``."""
    if encoding not in CODES:
        raise ValueError(f"unknown encoding {encoding!r}; one of {', '.join(ENCODINGS)}")
    return CODES[encoding]


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack the last axis of a 0/1 array, 8 to a byte, little-endian: ``(..., C) -> (..., ceil(C/8))`` uint8."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``(..., ceil(count/8))`` uint8 -> ``(..., count)`` uint8 of 0/1."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.shape[-1] != -(-count // 8):
        raise ValueError(f"{packed.shape[-1]} bytes per row cannot hold {count} bits (need {-(-count // 8)})")
    return np.unpackbits(packed, axis=-1, count=count, bitorder="little")


def unit_weights(bits: np.ndarray, encoding: str) -> np.ndarray:
    """The unit weights (float64) of unpacked bits: sign 1 -> -1, 0 -> +1; magnitude 1 -> 1, 0 -> 0."""
    return binary_code(encoding).unit([np.asarray(bits, dtype=np.float64)])


def weight_words(bits: np.ndarray, channels: int, encoding: str, word_bits: int) -> np.ndarray:
    """The op's uint8 bits ``(O, kh, kw, ceil(C/8))`` -> the kernel's sign-bit words
    ``(O, kh, kw, ceil(C / word_bits))`` (magnitude: the complement, ``u_sign = 2u - 1``)."""
    unpacked = unpack_bits(bits, channels)
    if encoding == "magnitude":
        unpacked = 1 - unpacked
    words = -(-channels // word_bits)
    padded = np.zeros((*unpacked.shape[:-1], words * word_bits), np.uint8)
    padded[..., :channels] = unpacked
    packed = pack_bits(padded)  # little-endian bytes = little-endian words
    return np.ascontiguousarray(packed).view(f"<u{word_bits // 8}").astype(f"uint{word_bits}")


def decode_bits(bits_oc: np.ndarray, channels: int) -> np.ndarray:
    """Re-pack op bits ``(planes, O, kh, kw, ceil(C/8))`` along the output channels:
    ``(planes, kh, kw, C, ceil(O/8))``, the layout the decode kernel reads."""
    unpacked = unpack_bits(bits_oc, channels)  # (planes, O, kh, kw, C)
    return pack_bits(np.moveaxis(unpacked, 1, -1))


def float_weight_hwio(bits_oc: np.ndarray, channels: int, scale: np.ndarray, code: WeightCode) -> np.ndarray:
    """Compile-time decode of ``(planes, O, kh, kw, ceil(C/8))`` bits: ``(kh, kw, C, O)`` float32."""
    unpacked = unpack_bits(bits_oc, channels).astype(np.float64)  # (planes, O, kh, kw, C)
    weight = code.unit(unpacked) * np.asarray(scale, np.float64).reshape(-1, 1, 1, 1)
    return np.ascontiguousarray(np.transpose(weight, (1, 2, 3, 0))).astype(np.float32)
