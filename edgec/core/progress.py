"""Stage progress: silent (library) or a rich display on stderr (CLI).

Library code calls ``progress.stage("build")`` as a context manager and
never prints; the CLI passes a :class:`ConsoleProgress` that shows a spinner
per stage and its time on stderr, so stdout stays machine-readable.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


class Progress:
    """Records how long each stage took; logs at debug level."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        start = time.perf_counter()
        log.debug("stage %s started %s", name, detail)
        try:
            with self._display(name, detail):
                yield
        except BaseException:
            self._failed(name, time.perf_counter() - start)
            raise
        elapsed = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        self._done(name, detail, elapsed)

    @contextlib.contextmanager
    def _display(self, name: str, detail: str) -> Iterator[None]:
        yield

    def _done(self, name: str, detail: str, elapsed: float) -> None:
        log.debug("stage %s done in %.2fs", name, elapsed)

    def _failed(self, name: str, elapsed: float) -> None:
        log.debug("stage %s failed after %.2fs", name, elapsed)


class ConsoleProgress(Progress):
    """Spinner while a stage runs, then ``✓ stage  detail  1.23 s`` on stderr."""

    def __init__(self, console=None) -> None:
        super().__init__()
        from rich.console import Console

        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def _display(self, name: str, detail: str) -> Iterator[None]:
        with self.console.status(f"[bold]{name}[/] {detail}", spinner="dots"):
            yield

    def _done(self, name: str, detail: str, elapsed: float) -> None:
        self.console.print(f"[green]✓[/] {name:<8} {detail:<48} [dim]{elapsed:6.2f} s[/]", highlight=False)

    def _failed(self, name: str, elapsed: float) -> None:
        self.console.print(f"[red]✗[/] {name:<8} failed after {elapsed:.2f} s", highlight=False)
