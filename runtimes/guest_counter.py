"""The guest side of instruction counting, for Python programs running under qemu-user.

edgec's QEMU plugin (``agent/plugin/icount.c``) counts the guest instructions
of every guest thread; a program asks for its own thread's count with a system
call no kernel has (``agent/src/icount.h`` describes the request; the numbers
below are the same, and ``tests/runtimes/test_icount.py`` checks that they agree). The
native agent asks in C++; this module asks from Python, through ctypes: for
``edgec device serve`` in an emulated arm64 Python, and for the ncnn peer in
``bench/peers_arm.py``.

Standard library only, and no edgec import: a Python under qemu that has no
edgec installed loads this file by its path.

    counts = read_counts()             # None on a real machine or without the plugin
    evaluator = count_evaluator(f, number=1, repeat=2)
    evaluator(*args)                   # -> {"number": 1, "instructions": [...], "other_threads": [...]}
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable
from typing import Any

SYSCALL = 0xEDC0  # EDGEC_ICOUNT_SYSCALL
ASK = 0x45444743  # EDGEC_ICOUNT_ASK, "EDGC"
ANSWER = 0x49434E54  # EDGEC_ICOUNT_ANSWER, "ICNT"
UNCOUNTED_CALLS = 2  # EDGEC_ICOUNT_UNCOUNTED_CALLS: calls before counting


class _Request(ctypes.Structure):
    """struct edgec_icount."""

    _fields_ = [("magic", ctypes.c_uint64), ("thread", ctypes.c_uint64), ("all_threads", ctypes.c_uint64), ("vcpu", ctypes.c_uint64)]


_libc = None


def read_counts() -> tuple[int, int] | None:
    """(this thread's, all threads') guest instructions so far; None when nothing counts them."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    request = _Request(ASK, 0, 0, 0)
    _libc.syscall(ctypes.c_long(SYSCALL), ctypes.c_long(ASK), ctypes.byref(request))  # -ENOSYS, answered or not
    if request.magic != ANSWER:
        return None
    return request.thread, request.all_threads


def count_calls(function: Callable[[], Any], number: int, repeat: int) -> dict[str, Any]:
    """Guest instructions of ``number`` calls of ``function``, ``repeat`` times, on this thread.

    The first UNCOUNTED_CALLS calls are not counted (as in edgec-agent's count
    evaluator: lazy initialisation, then the heap settling). Each count is net of
    the instructions of reading the counter (measured between two reads), so
    what remains is the calls and this loop. ``other_threads``: instructions
    other threads ran meanwhile.
    """
    if number < 1 or repeat < 1:
        raise ValueError("number and repeat must be >= 1")
    if read_counts() is None:
        raise RuntimeError(
            "this process counts no instructions: that needs qemu-user with edgec's counting plugin "
            "(real boards report time only)"
        )
    for _ in range(UNCOUNTED_CALLS):
        function()
    first, second = read_counts(), read_counts()
    reading = second[0] - first[0]
    instructions, other_threads = [], []
    for _ in range(repeat):
        before = read_counts()
        for _ in range(number):
            function()
        after = read_counts()
        own = after[0] - before[0]
        instructions.append(own - reading)
        other_threads.append(after[1] - before[1] - own)
    return {"number": number, "instructions": instructions, "other_threads": other_threads}


def count_evaluator(function: Callable[..., Any], number: int, repeat: int) -> Callable[..., str]:
    """Like TVM's time evaluator: a function of ``function``'s arguments returning count_calls as JSON."""

    def evaluate(*args: Any) -> str:
        return json.dumps(count_calls(lambda: function(*args), number, repeat))

    return evaluate
