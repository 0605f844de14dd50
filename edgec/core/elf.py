"""Is a file a whole ELF shared object for a given CPU? Checked before anything dlopens it.

``dlopen`` maps a shared object's segments straight from the file: a file cut
short kills the process with SIGBUS on first touch, and a foreign or garbage
file ends in a loader error deep inside TVM. Reading the headers first turns
both into a sentence. The fields used (System V ABI, little endian)::

    e_ident   magic 7f 'E' 'L' 'F', EI_CLASS (1: 32-bit, 2: 64-bit), EI_DATA (1: LE)
    e_type    3: ET_DYN (a shared object)
    e_machine 40: ARM, 62: x86-64, 183: AArch64
    e_phoff, e_phentsize, e_phnum: the program headers; every segment's bytes
              [p_offset, p_offset + p_filesz) must lie inside the file
    e_shoff, e_shentsize, e_shnum: the section header table, also inside the file
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

MACHINES = {3: "x86 (32-bit)", 40: "ARM (32-bit)", 62: "x86-64", 183: "AArch64"}
# an artifact's target cpu_arch -> (e_machine, EI_CLASS)
CPU_ARCH = {"x86_64": (62, 2), "armv7": (40, 1), "aarch64": (183, 2)}

# offsets of (e_phoff, e_shoff, e_phentsize, e_phnum, e_shentsize, e_shnum) and a
# program header's (p_offset, p_filesz), per EI_CLASS
_HEADER = {1: ("<II", 28, "<HHHH", 42), 2: ("<QQ", 32, "<HHHH", 54)}
_SEGMENT = {1: ("<I", 4, "<I", 16), 2: ("<Q", 8, "<Q", 32)}


class ElfProblem(ValueError):
    """The file is not a complete ELF shared object for the wanted CPU; the message says how."""


@dataclasses.dataclass(frozen=True)
class ElfInfo:
    elf_class: int
    machine: int
    file_type: int

    @property
    def machine_name(self) -> str:
        return MACHINES.get(self.machine, f"machine {self.machine}")


def read_header(data: bytes) -> ElfInfo:
    """The identifying fields; ElfProblem when ``data`` is no little-endian ELF file."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise ElfProblem(f"it is not an ELF shared object (starts with {data[:4]!r}, {len(data)} bytes)")
    elf_class, encoding = data[4], data[5]
    if elf_class not in _HEADER or encoding != 1:
        raise ElfProblem(f"it is an ELF file of an unknown class/byte order ({elf_class}/{encoding})")
    file_type, machine = struct.unpack_from("<HH", data, 16)
    return ElfInfo(elf_class, machine, file_type)


def check_shared_object(path: Path, cpu_arch: str) -> ElfInfo:
    """ElfProblem unless ``path`` is a complete ELF shared object for ``cpu_arch``."""
    data = path.read_bytes()
    info = read_header(data)
    if info.file_type != 3:
        raise ElfProblem(f"it is an ELF file of type {info.file_type}, not a shared object (3)")
    wanted = CPU_ARCH.get(cpu_arch)
    if wanted is not None and (info.machine, info.elf_class) != wanted:
        raise ElfProblem(
            f"it holds {info.machine_name} code ({32 * info.elf_class}-bit), but the artifact's target is {cpu_arch}"
        )
    offsets, at, counts, counts_at = _HEADER[info.elf_class]
    phoff, shoff = struct.unpack_from(offsets, data, at)
    phentsize, phnum, shentsize, shnum = struct.unpack_from(counts, data, counts_at)
    size = len(data)
    if phoff + phentsize * phnum > size or shoff + shentsize * shnum > size:
        raise ElfProblem(f"it is truncated: its header tables end past its {size} bytes")
    offset_format, offset_at, filesz_format, filesz_at = _SEGMENT[info.elf_class]
    for index in range(phnum):
        start = phoff + index * phentsize
        (p_offset,) = struct.unpack_from(offset_format, data, start + offset_at)
        (p_filesz,) = struct.unpack_from(filesz_format, data, start + filesz_at)
        if p_offset + p_filesz > size:
            raise ElfProblem(
                f"it is truncated: segment {index} needs bytes up to {p_offset + p_filesz}, the file has {size}"
            )
    return info
