"""A machine-wide reader/writer lock that keeps latency measurements free of other trials' work.

Trials on one machine share its cores. Heavy work (export, accuracy) holds the lock *shared*, so
several trials may run it at once; a latency measurement holds it *exclusively*, so it starts only
when no other trial computes and none starts until it ends. A turnstile lock gives waiting
measurements priority over new heavy work (no starvation). Built on ``fcntl.flock`` files, so it
spans processes (Ray workers) and is released by the kernel if a process dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def default_lock_path() -> Path:
    return Path(tempfile.gettempdir()) / f"slimtune-{os.getuid()}-cores.lock"


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), mode)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive_file(path: Path) -> Iterator[None]:
    """A mutex across this machine's processes on the lock file ``path`` (created if missing): one
    holder at a time, released by the kernel if the holder dies."""
    with _flock(path, fcntl.LOCK_EX):
        yield


class NodeLock:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_lock_path()
        self.turnstile = self.path.with_name(self.path.name + ".turnstile")

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold while doing heavy work that may overlap with other trials' heavy work."""
        with _flock(self.turnstile, fcntl.LOCK_EX):
            pass  # wait behind any measurement that is queued
        with _flock(self.path, fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold while timing: no other trial's work runs on this machine meanwhile."""
        with _flock(self.turnstile, fcntl.LOCK_EX), _flock(self.path, fcntl.LOCK_EX):
            yield
