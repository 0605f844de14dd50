"""Fallback records: where a graph rewrite or a schedule rule of edgec could not
handle part of a model, and TVM's default took over for that part only.

A fallback never fails a build. Each one is logged at INFO (``edgec -v``) and
kept in the manifest as ``schedules.fallbacks: [{kernel, rule, reason}]``:

- a schedule rule: ``kernel`` is the kernel's name in ``lib.so``, ``rule`` the
  rule that failed on it (``conv2d-nhwc``); the kernel gets the next rule that
  works, else TVM's default loop nest;
- a graph rewrite: ``kernel`` names the Relax op and its shapes (the region the
  rewrite left alone, before kernels exist), ``rule`` is ``graph:<rewrite>``;
- a whole stage (the last line of defence): ``kernel`` is ``*``.

This module depends on nothing else in edgec, so every layer can record into it.
"""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)

ALL_KERNELS = "*"


@dataclasses.dataclass(frozen=True)
class Fallback:
    kernel: str
    rule: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


class FallbackLog:
    """The fallbacks of one build, in the order they happened (duplicates dropped)."""

    def __init__(self) -> None:
        self.records: list[Fallback] = []

    def add(self, kernel: str, rule: str, reason: str, instead: str) -> Fallback:
        """Record that ``rule`` failed on ``kernel`` for ``reason``; ``instead`` says what runs now."""
        record = Fallback(kernel, rule, one_line(reason))
        if record not in self.records:
            self.records.append(record)
            log.info("fallback: %s on %s failed (%s); %s", rule, kernel, record.reason, instead)
        return record

    def rules_failed_on(self, kernel: str) -> set[str]:
        return {record.rule for record in self.records if record.kernel == kernel}

    def __iter__(self):
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def as_list(self) -> list[dict[str, str]]:
        return [record.as_dict() for record in self.records]


def one_line(reason: object, limit: int = 300) -> str:
    """The informative line of an error message: TVM puts the check that failed last."""
    if isinstance(reason, BaseException):
        lines = [line.strip() for line in str(reason).strip().splitlines() if line.strip()]
        text = lines[-1] if lines else type(reason).__name__
    else:
        text = " ".join(str(reason).split())
    return text[:limit]
