"""What the machine doing the compiling is: its CPU name as LLVM knows it."""

from __future__ import annotations

import functools
import logging
import platform

log = logging.getLogger(__name__)


@functools.cache
def host_cpu_name() -> str:
    """LLVM's name for this machine's CPU (e.g. ``znver5``, ``sapphirerapids``).

    TVM's LLVM rejects ``"mcpu": "native"``, so the name is asked of LLVM itself.
    Falls back to the generic ``x86-64-v2`` when LLVM cannot tell.
    """
    from tvm.target import codegen

    try:
        name = str(codegen.llvm_get_system_cpu())
    except Exception as error:  # noqa: BLE001 - an FFI error type varies by build
        log.warning("could not detect host CPU (%s); using x86-64-v2", error)
        return "x86-64-v2"
    if not name or name == "generic":
        return "x86-64-v2"
    return name


def host_machine() -> str:
    """``x86_64``, ``aarch64``, ``armv7l``... as the kernel reports it."""
    return platform.machine()
