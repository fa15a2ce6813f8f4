"""The honest final front: its points' latencies measured again, in isolation, before publishing.

During the search, trials share the machine (their timed runs hold the node lock, but caches, turbo
clocks and memory traffic still differ from run to run). Before the front is published, every
front point's artifact is timed again, one at a time, in a fixed order (trial number), with
nothing else running, and with them the references the front is read against (fp32, the
one-click reference). The search-time figures are kept as ``search_latency_ms`` /
``search_latency_p90_ms``; ``latency_ms`` becomes the isolated one, the front is recomputed, and
points that join it are re-measured too, until the front is stable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from slimtune.config import LatencyConfig
from slimtune.evaluators import as_dict
from slimtune.evaluators.latency import measure_latency
from slimtune.evaluators.node_lock import NodeLock
from slimtune.search.objectives import Objectives
from slimtune.search.pareto import pareto_numbers
from slimtune.search.records import TrialRecord

Remeasured = Callable[[TrialRecord], None]
log = logging.getLogger("slimtune.search")


Retime = Callable[[TrialRecord], dict[str, float]]


def isolated_latency(artifact: str, feeds: dict[str, np.ndarray], cfg: LatencyConfig, lock_path: str) -> dict[str, float]:
    """Latency figures of one artifact, timed under the machine's exclusive lock (runs on the node holding it)."""
    return as_dict(measure_latency(Path(artifact), feeds, cfg, NodeLock(Path(lock_path))))


def remeasure(record: TrialRecord, isolated: dict[str, float]) -> TrialRecord:
    """``record`` with the re-measured latency figures; the search-time ones kept beside them."""
    search_time = {f"search_{k}": record.metrics[k] for k in ("latency_ms", "latency_p90_ms", "latency_spread")}
    return replace(record, metrics={**record.metrics, **search_time, **isolated, "remeasured": 1})


def remeasure_front(records: list[TrialRecord], objectives: Objectives, retime: Retime,
                    on_remeasured: Remeasured | None = None,
                    progress: Callable[[int], None] | None = None,
                    baselines: frozenset[int] = frozenset()) -> tuple[list[TrialRecord], set[int]]:
    """Re-time the front until it is stable; returns the updated records and the published front.

    ``retime(record)`` times the record's artifact where it lies (``isolated_latency`` there); a
    point it cannot time keeps its search-time figures (``remeasured`` absent) and a warning says so.
    ``baselines``: trial numbers of the points the front is read against (fp32, the one-click
    reference), re-timed in the same window whether on the front or not: a machine whose speed
    drifts (on a 2-core AMD EPYC VM the same uniform-int8 file timed 78.9 ms in one search and 47.2 ms
    in another 17 minutes later) would otherwise set a front timed at the end against references
    timed at the start.
    """
    by_number = {r.number: r for r in records}
    front = pareto_numbers(records, objectives)
    done: set[int] = set()
    while True:
        pending = sorted(n for n in (front | (baselines & set(by_number))) - done if by_number[n].metrics.get("artifact"))
        if not pending:
            return [by_number[r.number] for r in records], front
        for number in pending:
            done.add(number)
            try:
                by_number[number] = remeasure(by_number[number], retime(by_number[number]))
            except Exception as exc:  # noqa: BLE001 - a node gone or a file lost: keep the search-time figures
                log.warning("could not re-measure %s (%s: %s); its search-time latency stays",
                            by_number[number].name, type(exc).__name__, exc)
                continue
            if on_remeasured:
                on_remeasured(by_number[number])
            if progress:
                progress(len(done))
        front = pareto_numbers(list(by_number.values()), objectives)
