"""Whether the machine was quiet while a latency figure was timed.

The node lock keeps slimtune's own trials apart; other programs on the machine (a build, a browser,
another user's job, a noisy neighbour on a shared VM) are not bound by it. While a figure is timed,
two counters say how much of the CPU the measurement did not get:

- the time this process's threads were ready to run but waited for a CPU (the kernel's run-queue
  wait, ``/proc/self/task/*/schedstat``, nanoseconds), which is what another program taking the
  cores costs the measurement;
- the time the hypervisor gave the machine's CPUs to other guests (``steal`` in ``/proc/stat``).

``contention`` is their sum as a fraction of the CPU time the measurement's threads could have had
(wall time x threads): 0.0 on a quiet machine, 0.5 when half of it went elsewhere. Where the
kernel offers neither counter (not Linux), it is None: unknown, never reported as quiet.

A latency figure is the median of its timed runs, so it is judged the same way: each timed run's
contention is read around that run alone (not the session's creation or the warm-up), and the
figure's is their median (``median_contention``). A burst that crowds out a few runs (one of Ray's
own threads waking, a steal tick of 10 ms landing on a sub-millisecond run) leaves the median, and
the figure, as they were; a program that takes the cores for the whole measurement shows in every run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LoadSample:
    """Counters at one moment: seconds of wall clock, of run-queue wait summed over this process's
    threads, and of hypervisor steal summed over the machine's CPUs (None where unavailable)."""

    wall_s: float
    wait_s: float | None
    steal_s: float | None


def _run_queue_wait_s() -> float | None:
    total, seen = 0, False
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:  # a thread that ended between the listing and the read
            continue
        if len(fields) >= 2:
            total, seen = total + int(fields[1]), True
    return total / 1e9 if seen else None


def _steal_s() -> float | None:
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def take_sample() -> LoadSample:
    return LoadSample(time.perf_counter(), _run_queue_wait_s(), _steal_s())


def contention(before: LoadSample, after: LoadSample, threads: int, wall_s: float | None = None) -> float | None:
    """The fraction (0..1) of the CPU time ``threads`` threads could have had between the two
    samples that went to other work instead; None when neither counter is available. ``wall_s``:
    the timed span, when the caller timed it itself (the samples' own reading then not counted)."""
    wall = after.wall_s - before.wall_s if wall_s is None else wall_s
    if wall <= 0 or (before.wait_s is None and before.steal_s is None):
        return None
    lost = 0.0
    if before.wait_s is not None and after.wait_s is not None:
        lost += max(0.0, after.wait_s - before.wait_s)
    if before.steal_s is not None and after.steal_s is not None:
        cores = os.cpu_count() or 1
        lost += max(0.0, after.steal_s - before.steal_s) * min(threads, cores) / cores
    return min(1.0, lost / (wall * max(1, threads)))


def is_busy(value: float | None, threshold: float) -> bool:
    """``threshold``: ``LatencyConfig.busy_threshold``, the fraction of lost CPU time that flags a timing."""
    return value is not None and value > threshold


def median_contention(per_run: list[float | None]) -> float | None:
    """The contention of a figure that is the median of timed runs: the median of the runs' own
    contention; None when a run's is unknown (no counters) or there are no runs."""
    if not per_run or any(value is None for value in per_run):
        return None
    ordered = sorted(per_run)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
