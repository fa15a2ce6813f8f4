"""The one Ray callback of a search: trial records from Ray's trial objects, told to listeners.

``TrialLog`` numbers trials in the order they were proposed, turns Ray's trial objects into plain
``TrialRecord`` values and tells listeners (progress display, MLflow) when a trial starts and when
it ends. Every trial ends in exactly one of: completed, failed, stopped; ``close_open_trials``
guarantees that even when the driver is interrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from slimtune.search.objectives import Objectives
from slimtune.search.records import TrialListener, TrialRecord
from slimtune.search.shipping import read_fault
from slimtune.spaces import SearchSpace

log = logging.getLogger("slimtune.search")
# What Ray Tune adds to every reported result; a trial's record keeps slimtune's own figures only.
RAY_BOOKKEEPING = frozenset(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint"}


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    try:
        lines = [ln for ln in open(path).read().splitlines() if ln.strip()] if path else []
    except OSError:
        lines = []
    return lines[-1].strip()[:500] if lines else "trial raised an error"


class TrialLog(Callback):
    def __init__(self, space: SearchSpace, objectives: Objectives,
                 listeners: tuple[TrialListener, ...] | list = (), first_number: int = 0,
                 seeds: dict[str, dict[str, Any]] | None = None,
                 hold: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """``first_number``: the number of the first trial (after a resumed search's earlier ones);
        ``seeds``: other enqueued plans by name (they are labelled like the reference points);
        ``hold``: entered around the listeners' work (the node lock held shared: logging a trial to
        MLflow takes the CPU a trial's timing on this machine would otherwise lose to it)."""
        self.first_number = first_number
        self.listeners = tuple(listeners)
        self.hold = hold
        self.objectives = objectives
        self._references = {**space.reference_points(), **(seeds or {})}
        self._by_id: dict[str, TrialRecord] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles callbacks with the experiment state; live listeners (consoles, clients) stay here.
        return {**self.__dict__, "listeners": (), "hold": nullcontext}

    @property
    def records(self) -> list[TrialRecord]:
        return sorted(self._by_id.values(), key=lambda r: r.number)

    def _tell(self, event: str, record: TrialRecord) -> None:
        """Pass a trial event to every listener; one that raises is reported and the search goes on."""
        with self.hold():
            for listener in self.listeners:
                try:
                    getattr(listener, event)(record)
                except Exception as exc:  # noqa: BLE001 - a display or a store must not end the search
                    log.warning("%s failed for %s: %s: %s", type(listener).__name__, record.name,
                                type(exc).__name__, exc)

    def _reference_of(self, params: dict[str, Any]) -> str:
        return next((name for name, ref in self._references.items() if ref == params), "")

    def _finish(self, trial: Any, status: str, error: str = "") -> None:
        record = self._by_id.get(trial.trial_id)
        if record is None or record.status != "running":
            return
        metrics = {k: v for k, v in (trial.last_result or {}).items() if k not in RAY_BOOKKEEPING}
        if status == "completed" and not all(name in metrics for name, _ in self.objectives):
            status = "stopped"
        record = replace(record, status=status, metrics=metrics if status == "completed" else {}, error=error)
        self._by_id[trial.trial_id] = record
        self._tell("trial_finished", record)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self._by_id:
            return
        params = dict(trial.config)
        # Numbered in the order the searcher proposed them (``trials`` is in creation order), not the
        # order they happened to start in: the same seed gives the same trial-007.
        created = next((i for i, t in enumerate(trials) if t.trial_id == trial.trial_id), len(self._by_id))
        record = TrialRecord(number=self.first_number + created, trial_id=trial.trial_id, params=params,
                             reference=self._reference_of(params))
        self._by_id[trial.trial_id] = record
        self._tell("trial_started", record)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "completed")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "failed", read_fault(trial.trial_id) or _error_text(trial))

    def close_open_trials(self) -> None:
        """Mark every trial still running as stopped (time budget hit, driver interrupted)."""
        for record in list(self._by_id.values()):
            if record.status == "running":
                stopped = replace(record, status="stopped", error="the search ended before this trial finished")
                self._by_id[record.trial_id] = stopped
                self._tell("trial_finished", stopped)
