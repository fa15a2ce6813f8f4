"""Per-trial limits: a trial that runs too long or takes too much memory ends its worker process.

Python cannot interrupt a thread stuck in native code (an export, an ONNX Runtime session), so the
watchdog reports the reason (``search/shipping.py``: Ray's key-value store, readable by the driver
on any node) and ends the worker process; Ray records the trial as errored, the trial log reads the
reason back, and the kernel releases the node lock and the memory. The next trial starts in a
fresh worker.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path

WATCHDOG_EXIT_CODE = 70
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_mb() -> float:
    """This process's resident memory now (Linux ``/proc``), else its peak (MB = 1e6 bytes)."""
    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * _PAGE_BYTES / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


class TrialWatchdog:
    """Context manager around one trial: ``timeout_s`` (s) and ``memory_mb`` (resident MB of the worker
    process, model and task included); ``None`` means no limit."""

    def __init__(self, report: Callable[[str], None], timeout_s: float | None, memory_mb: float | None,
                 poll_s: float = 0.2) -> None:
        self.report, self.timeout_s, self.memory_mb, self.poll_s = report, timeout_s, memory_mb, poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _reason(self, started: float) -> str | None:
        elapsed = time.monotonic() - started
        if self.timeout_s is not None and elapsed > self.timeout_s:
            return f"TrialTimeout: the trial ran past search.trial_timeout_s = {self.timeout_s:g} s and was ended"
        if self.memory_mb is not None and (used := resident_mb()) > self.memory_mb:
            return (f"TrialOutOfMemory: the worker used {used:.0f} MB, over search.trial_memory_mb = "
                    f"{self.memory_mb:g} MB, and was ended")
        return None

    def _watch(self, started: float) -> None:
        while not self._stop.wait(self.poll_s):
            reason = self._reason(started)
            if reason:
                self.report(reason)
                os._exit(WATCHDOG_EXIT_CODE)

    def __enter__(self) -> TrialWatchdog:
        if self.timeout_s is not None or self.memory_mb is not None:
            self._thread = threading.Thread(target=self._watch, args=(time.monotonic(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
