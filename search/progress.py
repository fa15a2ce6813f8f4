"""A live progress display for long searches: a Rich bar with counts, the best figure so far, the
front's hypervolume and the time left in the budget."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from slimtune.search.records import TrialRecord


class ProgressDisplay:
    """Listener that advances a bar as trials end and prints one line per finished trial."""

    def __init__(self, total: int, objective: tuple[str, str], console: Console | None = None,
                 front=None, budget_s: float | None = None) -> None:
        """``objective``: the task's searched metric and its goal ("max" or "min"), shown as the best so far;
        ``front``: a ``FrontProgress`` whose hypervolume is shown; ``budget_s``: the search's time budget."""
        self.front = front
        self.deadline = time.monotonic() + budget_s if budget_s else None
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), console=self.console, transient=False,
        )
        self.task = self.progress.add_task("search", total=total, status="starting Ray")
        self.counts = {"running": 0, "completed": 0, "failed": 0, "stopped": 0}
        self.metric, goal = objective
        self._better = max if goal == "max" else min
        self.best = float("nan")

    def __enter__(self) -> ProgressDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _status(self) -> str:
        c = self.counts
        parts = [f"{c['running']} running, {c['completed']} done, {c['failed']} failed"]
        if c["completed"]:
            parts.append(f"best {self.metric} {self.best:.3f}")
        if self.front is not None:
            parts.append(f"hypervolume {self.front.hypervolume:.3f}")
        if self.deadline is not None:
            left = max(0, int(self.deadline - time.monotonic()))
            parts.append(f"{left // 3600}h{left % 3600 // 60:02d}m left")
        return ", ".join(parts)

    def trial_started(self, record: TrialRecord) -> None:
        self.counts["running"] += 1
        self.progress.update(self.task, status=self._status())

    def trial_finished(self, record: TrialRecord) -> None:
        self.counts["running"] -= 1
        self.counts[record.status] += 1
        if record.status == "completed":
            m = record.metrics
            value = float(m[self.metric])
            self.best = value if self.counts["completed"] == 1 else self._better(self.best, value)
            self.console.log(f"{record.label}: {self.metric} {value:.4f}, latency {m['latency_ms']:.1f} ms, "
                             f"size {m['size_mb']:.1f} MB" + (" (cached)" if m.get("cached") else ""))
        else:
            self.console.log(f"[red]{record.label} {record.status}[/red]: {record.error}")
        self.progress.update(self.task, advance=1, status=self._status())
