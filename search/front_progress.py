"""How much the front improves as trials finish: hypervolume (Optuna's implementation) and patience.

The hypervolume is computed in a space fixed relative to the search's own uncompressed (fp32)
reference, so it needs no tuning per model or task and stays comparable within a search:
quality as a fraction of fp32's (its inverse for a minimised metric), latency and size as
fractions of fp32's. The reference point is (quality floor, latency 1, size 1): a point contributes
the volume it dominates inside the box "keeps ``search.quality_floor`` of fp32's metric, no slower
and no larger than fp32". It is 0 until the fp32 reference has completed, and is computed on
fp32's hardware target.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from slimtune.search.objectives import Objectives
from slimtune.search.records import TrialRecord


def normalised_hypervolume(points: list[tuple[float, float, float]], quality_floor: float = 0.0) -> float:
    """Hypervolume of points given as (quality, latency, size) fractions of fp32's (quality: higher
    is better), against the reference point (``quality_floor``, 1, 1), divided by the box's quality
    depth (1 - floor): a free model as good as fp32 would score 1.0."""
    from optuna._hypervolume import compute_hypervolume  # the computation behind optuna's hypervolume history

    reference = np.array([-quality_floor, 1.0, 1.0])  # in the minimised space: (-quality, latency, size)
    minimised = np.array([(-q, lat, size) for q, lat, size in points]).reshape(-1, 3)
    inside = minimised[np.all(minimised < reference, axis=1)]
    return float(compute_hypervolume(inside, reference)) / (1.0 - quality_floor) if len(inside) else 0.0


def hypervolume(records: list[TrialRecord], objectives: Objectives, quality_floor: float = 0.0) -> float:
    """The hypervolume of the completed trials, normalised by the fp32 reference (0.0 without one)."""
    fp32 = next((r for r in records if r.reference == "fp32" and r.status == "completed"), None)
    if fp32 is None:
        return 0.0
    (metric, goal), *_ = objectives
    base = fp32.values(objectives)
    target = fp32.metrics.get("hardware", "")
    points = []
    for record in records:
        if record.status != "completed" or record.metrics.get("hardware", "") != target:
            continue
        quality, latency, size = record.values(objectives)
        ratio = quality / base[0] if goal == "max" else base[0] / quality
        points.append((ratio, latency / base[1], size / base[2]))
    return normalised_hypervolume(points, quality_floor)


class FrontProgress:
    """Listener: recomputes the hypervolume when a trial ends; counts trials since it last improved.

    ``on_change(hypervolume, completed_trials)`` is called after every completed trial (MLflow logs
    it as a metric history). ``patience``: ``should_stop`` turns true after that many finished trials
    without improvement (failed ones count: they cost the same time).
    """

    def __init__(self, objectives: Objectives, patience: int | None = None,
                 on_change: Callable[[float, int], None] | None = None, quality_floor: float = 0.0) -> None:
        self.objectives = objectives
        self.quality_floor = quality_floor
        self.patience = patience
        self.on_change = on_change
        self.records: list[TrialRecord] = []
        self.hypervolume = 0.0
        self.best = 0.0
        self.since_improvement = 0

    def trial_started(self, record: TrialRecord) -> None:
        pass

    def trial_finished(self, record: TrialRecord) -> None:
        self.records.append(record)
        if record.status == "completed":
            self.hypervolume = hypervolume(self.records, self.objectives, self.quality_floor)
            if self.on_change:
                self.on_change(self.hypervolume, sum(r.status == "completed" for r in self.records))
        if self.hypervolume > self.best + 1e-12:
            self.best, self.since_improvement = self.hypervolume, 0
        else:
            self.since_improvement += 1

    def __getstate__(self) -> dict:
        # Ray pickles stoppers with the experiment state; the live callback (an MLflow client) stays here.
        return {**self.__dict__, "on_change": None}

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.since_improvement >= self.patience
