"""edgec's parallel launch (thread_pool.c), compiled and linked into each CPU ``lib.so``.

TVM's pool gives share i of every parallel loop to thread i and waits for all of them: on a
loaded machine a worker kept off its CPU stalls each kernel (MobileNetV2, two threads, beside two
busy processes: 344-408 ms per inference against 3-9 ms; README, Threads).
thread_pool.c lets the caller and the workers claim shares from one word, so a launch waits
only for shares a running thread has started. Its object replaces TVM's launch pointer inside
``lib.so`` itself: every loader (``edgec run``/``bench``/``profile``, an RPC server, the
edgec-agent on a board, a user's ``tvm.runtime.load_module``) runs the kernels with it.

Kernels that call TVM's parallel barrier need all shares running at once, which claiming does
not promise: a link whose objects reference the barrier keeps TVM's pool (``uses_barrier``).
"""

from __future__ import annotations

import logging
import mmap
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from edgec.core.errors import ToolchainError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("thread_pool.c")
OBJECT_NAME = "edgec_thread_pool.o"
BARRIER_SYMBOL = b"__TVMBackendParallelBarrier"  # in an object's string table when its code calls the barrier
C_OPTIONS = ("-x", "c", "-std=gnu11", "-O2", "-fPIC", "-fvisibility=hidden", "-c")


def uses_barrier(objects: Sequence[str]) -> bool:
    """Whether any of the object files ``objects`` refers to TVM's parallel barrier."""
    for path in objects:
        if str(path).endswith(".o") and Path(path).stat().st_size:
            with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                if data.find(BARRIER_SYMBOL) >= 0:
                    return True
    return False


def compile_object(compiler: str, directory: Path) -> Path:
    """thread_pool.c compiled by ``compiler`` (a gcc or g++ driver, host or cross) into ``directory``."""
    target = directory / OBJECT_NAME
    command = [compiler, *C_OPTIONS, str(SOURCE), "-o", str(target)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise ToolchainError(f"compiling edgec's thread pool ({SOURCE.name}) failed: {done.stderr.strip()}")
    return target


def with_thread_pool(link: Callable, compiler: str) -> Callable:
    """``link(output, objects, options)`` with thread_pool.c's object added to the objects (compiled
    by ``compiler`` in a temporary directory), unless they call TVM's parallel barrier."""

    def link_with_pool(output, objects, options=None):
        if uses_barrier(objects):
            log.info("lib.so keeps TVM's thread pool: its kernels use TVM's parallel barrier")
            link(output, objects, options=options)
            return
        with tempfile.TemporaryDirectory(prefix="edgec-pool-") as directory:
            link(output, [*objects, str(compile_object(compiler, Path(directory)))], options=options)

    return link_with_pool
