"""Instruction counts on emulated boards: the client side of ``edgec.device.count_evaluator``.

On a board emulated by ``edgec device emulate`` the agent runs under qemu-user
with edgec's counting plugin, and its ``edgec.device.count_evaluator`` counts,
on the device, the guest instructions a function executes on the calling
thread (C++: agent/src/agent.cc; Python guests: runtimes/guest_counter.py).
Counts are deterministic: the same build on the same board counts the same
instructions on every run, whatever the host's load, so they compare builds
(dense vs 1xN vs binary, schedule A vs B) where emulated time means nothing.

An instruction count is not a time: a board's time also depends on cache
misses, pipeline stalls and the cost of each instruction (a NEON multiply-add
and an integer add count one each). Real boards report time only.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from typing import Any

from edgec.core.errors import DeviceError

COUNT_REPEAT = 2  # counted runs per function: equal counts show the count is deterministic


@dataclasses.dataclass(frozen=True)
class InstructionCount:
    """Guest instructions of one call of a function on an emulated board, as the board counted them.

    ``runs``: the count of each counted call (``number`` calls per run,
    divided by ``number``); ``other_threads``: the most instructions another
    thread ran during a counted run (0 when the kernels run on one thread, as
    on boards from ``edgec device emulate``; otherwise ``per_call`` is only the
    calling thread's share). ``cpu``: the emulated CPU (qemu's ``-cpu``).
    """

    per_call: int
    runs: tuple[int, ...]
    other_threads: int
    cpu: str | None

    @property
    def deterministic(self) -> bool:
        return len(set(self.runs)) == 1

    def per_mac(self, macs: int) -> float | None:
        """Instructions per multiply-accumulate of a call doing ``macs`` of them (None without MACs)."""
        return self.per_call / macs if macs > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "per_call": self.per_call, "runs": list(self.runs), "deterministic": self.deterministic,
            "other_threads": self.other_threads, "cpu": self.cpu,
        }  # fmt: skip


def counts_instructions(device) -> bool:
    """Whether ``device`` (a Device of runtimes/session.py) counts instructions: an emulated board with the plugin."""
    return bool(device.info.get("counts_instructions"))


def count(device, module, name: str, arguments: Sequence[Any], *, number: int = 1, repeat: int = COUNT_REPEAT) -> InstructionCount:
    """Count ``module[name](*arguments)`` (``module`` None: the global function ``name``) on ``device``.

    Two uncounted calls first; then ``repeat`` runs of ``number`` calls each.
    """
    with device.step(f"counting the instructions of {name}"):
        evaluator = device.count_evaluator()(module, name, number, repeat)
        reply = json.loads(str(evaluator(*arguments)))
    if reply.get("number") != number or len(reply.get("instructions", ())) != repeat:
        raise DeviceError(f"{device.label}: edgec.device.count_evaluator answered {reply!r}; the agent is not edgec's")
    runs = tuple(int(total) // number for total in reply["instructions"])
    return InstructionCount(
        per_call=int(statistics.median(runs)),
        runs=runs,
        other_threads=max(int(value) for value in reply["other_threads"]),
        cpu=device.info.get("emulated_cpu"),
    )
