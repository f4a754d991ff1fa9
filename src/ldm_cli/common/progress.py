"""How long work reports itself: a rich bar on a terminal, a plain line otherwise.

docs/ARCHITECTURE.md, "Progress": long work shows a progress bar on a terminal and a log line every so often
when output is not a terminal (CI logs, SLURM); only the main process prints.

Off a terminal, `ProgressReporter` logs ``ldm: <what> i/n [unit] [info] (x unit/s)`` at most once every
`LOG_INTERVAL_S` seconds, and always once at the end; a reporter given ``every`` (training's
``logging.log_every``) logs every ``every`` steps instead. Nothing printed here is ever hard-wrapped:
log lines are written as they are, and every rich console is made by `make_console` (soft wrap).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

logger = logging.getLogger("ldm")

LOG_INTERVAL_S = 5.0  # off a terminal: at most one progress line per this many seconds (plus the final one)


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


def prints_progress() -> bool:
    """Whether this process shows progress: not one that `setup_logging(is_main=False)` silenced."""
    return logger.level <= logging.INFO  # NOTSET (logging never set up) counts as showing


def make_console(*, stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A rich console that never inserts line breaks into long lines, on a terminal or not
    (rich otherwise wraps at 80 columns when output is a file or a pipe)."""
    return Console(stderr=stderr, file=file, soft_wrap=True)


class ProgressReporter:
    """Shows `advance()` calls as a bar with an ETA on a terminal, or as log lines otherwise.

    Off a terminal a line is logged at most every `interval` seconds (default
    `LOG_INTERVAL_S`) and when the count reaches `total`; with `every`, every `every`
    steps instead. `enabled` None means `prints_progress()`: only the main process shows.
    """

    def __init__(
        self, description: str, total: int, start: int = 0, every: int | None = None, enabled: bool | None = None,
        *, unit: str = "it", interval: float | None = None, clock: Callable[[], float] = time.monotonic,
    ):
        self.description, self.total, self.every, self.unit = description, total, every, unit
        self.interval = LOG_INTERVAL_S if interval is None else interval
        self.enabled = prints_progress() if enabled is None else enabled
        self.clock = clock
        self.done = self.start = start
        self.start_time = self.last_line_time = clock()
        self.bar: Progress | None = None
        console = make_console(stderr=True)
        if self.enabled and console.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(self.counted()),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=False,
            )
            self.task = self.bar.add_task(description, total=total, completed=start, info="")

    def __enter__(self) -> "ProgressReporter":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def counted(self) -> str:
        """What the count is of, shown after it: the unit, unless it is the generic "it"."""
        return "" if self.unit == "it" else self.unit

    def rate(self) -> float:
        """Steps per second since this reporter started."""
        elapsed = self.clock() - self.start_time
        return (self.done - self.start) / elapsed if elapsed > 0 else 0.0

    def advance(self, info: str = "", *, by: int = 1) -> None:
        """Count `by` more steps done; `info` is shown beside the count."""
        before = self.done
        self.done += by
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, info=info)
        elif self._line_due(before):
            self.last_line_time = self.clock()
            logger.info(self.line(info))

    def _line_due(self, before: int) -> bool:
        """Off a terminal: the last step, a multiple of `every` passed, or `interval` seconds since the last line."""
        if self.done >= self.total:
            return before < self.total
        if self.every is not None:
            return self.done // self.every > before // self.every
        return self.clock() - self.last_line_time >= self.interval

    def line(self, info: str = "") -> str:
        """The plain progress line: ``<what> i/n [unit] [info] (x unit/s)``, on one line."""
        rate = f"({self.rate():.2f} {self.unit}/s)"
        return " ".join(p for p in (self.description, f"{self.done}/{self.total}", self.counted(), info, rate) if p)
