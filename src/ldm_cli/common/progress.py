"""How long work reports itself: a rich bar on a terminal, a plain line otherwise.

docs/ARCHITECTURE.md, "Progress": long work shows a progress bar on a terminal and a log line every so often
when output is not a terminal (CI logs, SLURM); only the main process prints.
"""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

logger = logging.getLogger("ldm")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(is_main: bool = True) -> None:
    """Plain `ldm: message` lines on stderr; non-main processes only show errors."""
    root = logging.getLogger("ldm")
    if not root.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("ldm: %(message)s"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(logging.INFO if is_main else logging.ERROR)


class ProgressReporter:
    """Shows `advance()` calls as a bar on a terminal, or as a line every `every` steps."""

    def __init__(self, description: str, total: int, start: int = 0, every: int = 50, enabled: bool = True):
        self.description, self.total, self.every = description, total, every
        self.enabled = enabled
        self.done = start
        self.start_time = time.perf_counter()
        self.start = start
        self.bar: Progress | None = None
        console = Console(stderr=True)
        if enabled and console.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
            )
            self.task = self.bar.add_task(description, total=total, completed=start, info="")

    def __enter__(self) -> "ProgressReporter":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def rate(self) -> float:
        """Steps per second since this reporter started."""
        elapsed = time.perf_counter() - self.start_time
        return (self.done - self.start) / elapsed if elapsed > 0 else 0.0

    def advance(self, info: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, info=info)
        elif self.done % self.every == 0 or self.done == self.total:
            logger.info(f"{self.description} {self.done}/{self.total} {info} ({self.rate():.2f} it/s)")
