"""Progress of a long phase (the sensitivity profile, each recovery, the re-timing, an export's
rebuild and verification) that reads the same live on a terminal and in a log.

On a terminal: a Rich bar (or spinner, when the amount of work is unknown) with the latest detail.
Anywhere else (CI logs, ``nohup``, a pipe) or with ``--quiet``: plain lines, no control
characters: one when the phase starts, one per event at most every ``every_s`` seconds, and one
when it ends with its duration, so no phase is silent for long and none floods a log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

LINE_EVERY_S = 10.0
"""In line mode, the most often a phase prints a progress line (seconds)."""


def live(console: Console) -> bool:
    """Whether ``console`` shows live displays: a terminal (``--quiet`` makes the CLI's console not one)."""
    return console.is_terminal and not console.is_dumb_terminal


class Phase:
    """``with Phase(console, "distilling front points", total=4) as phase: phase.update(1, detail=...)``."""

    def __init__(self, console: Console, description: str, total: int | None = None,
                 every_s: float = LINE_EVERY_S) -> None:
        self.console, self.description, self.total, self.every_s = console, description, total, every_s
        self.progress: Progress | None = None
        self.started = self.last_line = 0.0
        self.completed = 0

    def __enter__(self) -> Phase:
        self.started = self.last_line = time.monotonic()
        if live(self.console):
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                     console=self.console, transient=True)
            self.task = self.progress.add_task(self.description, total=self.total, detail="")
            self.progress.start()
        else:
            self.console.print(f"{self.description} ...", markup=False, highlight=False, soft_wrap=True)
        return self

    def update(self, completed: int | None = None, total: int | None = None, detail: str = "") -> None:
        """The work done so far (units of ``total``) and what is happening now, in words."""
        self.completed = completed if completed is not None else self.completed
        self.total = total if total is not None else self.total
        if self.progress is not None:
            self.progress.update(self.task, completed=self.completed, total=self.total, detail=detail)
            return
        now = time.monotonic()
        if now - self.last_line >= self.every_s or (self.total is not None and self.completed >= self.total):
            self.last_line = now
            count = f" {self.completed}/{self.total}" if self.total is not None else ""
            self.console.print(f"{self.description}:{count} {detail}".rstrip(), markup=False, highlight=False,
                               soft_wrap=True)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.progress is not None:
            self.progress.stop()
        elif kind is None:
            self.console.print(f"{self.description}: done in {time.monotonic() - self.started:.0f} s", markup=False,
                               highlight=False, soft_wrap=True)


PhaseFactory = Callable[..., Phase]
"""``phase(description, total=None)`` -> a ``Phase`` to enter: how a library step shows progress
without choosing where it goes."""


def phases_on(console: Console) -> PhaseFactory:
    """Phases shown on ``console``."""
    return lambda description, total=None: Phase(console, description, total)


QUIET: PhaseFactory = phases_on(Console(quiet=True))
"""Phases that show nothing (a quiet console prints nothing)."""
