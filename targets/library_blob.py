"""The modules lib.so carries (the Relax VM executable, its weights, the kernels' imports),
linked in from a file instead of through an LLVM constant.

``export_library`` serializes them into one blob, the ``__tvm_ffi__library_bin``
symbol that TVM's loader reads. By default TVM builds that blob as an LLVM
constant array and compiles it: for a model of 2.5 GB of weights (vit_h_14) the
blob, the LLVM constant and the emitted object are three copies in memory at
once. Here the blob is written to a file and an assembler ``.incbin`` puts the
same bytes under the same symbol: one copy, streamed to disk.

Where the bytes go matters once they pass 2 GB (vit_h_14, regnet_y_128gf): nothing
addressed from the code with a 32-bit offset may lie beyond them. On x86-64 they go to
``.lrodata`` (a large-data section, placed after ``.data``/``.bss``, as LLVM does for large
constants). On aarch64 ``.rodata`` comes before ``.eh_frame``, whose 32-bit PC-relative
entries point back at the code ("relocation truncated to fit: R_AARCH64_PREL32"), so the
bytes go to ``.data.rel.ro`` (after ``.eh_frame``; read-only once the loader has relocated,
and nothing in them is relocated); ``.got``/``.data`` behind them stay within ADRP's 4 GB.
On armv7 ``.rodata`` is fine: its unwind index is stripped before the link (presets.py).
"""

from __future__ import annotations

from pathlib import Path

SYMBOL = "__tvm_ffi__library_bin"

# section directive per CPU architecture (ELF); ARM assemblers take '%' where x86's take '@'
_SECTIONS = {
    "x86_64": '.section .lrodata.tvm_library_bin,"al",@progbits',
    "aarch64": '.section .data.rel.ro.tvm_library_bin,"aw",%progbits',
    "armv7": '.section .rodata.tvm_library_bin,"a",%progbits',
}


def assembly(blob: Path, cpu_arch: str) -> str:
    """Assembler source defining ``SYMBOL`` as the bytes of ``blob``."""
    return "\n".join((
        _SECTIONS[cpu_arch],
        f".globl {SYMBOL}",
        f".type {SYMBOL}, %object",
        ".balign 8",
        f"{SYMBOL}:",
        f'.incbin "{blob}"',
        f".size {SYMBOL}, . - {SYMBOL}",
        "",
    ))  # fmt: skip


def packer(cpu_arch: str):
    """An ``fpack_imports`` for ``export_library``: blob file + ``.S`` source (the link compiles it);
    None for architectures without a section here (TVM's own packing)."""
    if cpu_arch not in _SECTIONS:
        return None

    def pack(module, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        import numpy as np
        import tvm

        if is_system_lib or symbol_prefix:  # a system library registers its blob under a prefix: TVM's C path
            raise ValueError("library_blob packs dynamically loaded libraries only (no system-lib, no symbol prefix)")
        blob = Path(workspace_dir) / "library_bin.bin"
        tensor = tvm.get_global_func("runtime.ModulePackImportsToTensor")(module)
        np.from_dlpack(tensor).tofile(blob)  # a view of the tensor: no second copy
        del tensor
        source = Path(workspace_dir) / "library_bin.S"
        source.write_text(assembly(blob, cpu_arch))
        return str(source)

    return pack
