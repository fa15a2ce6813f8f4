"""Running slimtune searches for the search-methods benchmark, and reading their figures.

A run is one real ``slimtune.api.search`` (Ray, Optuna, MLflow, ONNX Runtime) with one sampler,
seed and trial budget; its figures are read from its trial records. Hypervolume, "best within one
point" and the per-trial time split are computed here from those records, each search against
its own fp32 reference (``Run.reference``): the same box relative to fp32 for every method.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtune import api
from slimtune.search.front_progress import normalised_hypervolume
from slimtune.search.records import TrialRecord

# Where a trial's worker time goes (s), as run_trial reports it; "overhead" is the rest of the wall time.
TIME_PARTS = ("load_s", "compress_s", "export_s", "quantize_s", "quality_s", "latency_s", "wait_s")


@dataclass(frozen=True)
class Point:
    """One measured candidate: quality (the task's metric, higher is better), latency (ms), size (MB)."""

    quality: float
    latency_ms: float
    size_mb: float
    label: str = ""
    artifact: str = ""
    number: int = -1  # the trial's number in its search


@dataclass(frozen=True)
class Reference:
    """The fixed box every method's hypervolume is measured in, relative to fp32's figures.

    Normalised objectives: quality as a fraction of fp32's, latency and size as fractions of fp32's.
    The reference point is (``quality_floor``, 1, 1): a candidate counts for the volume it dominates
    between "keeps ``quality_floor`` of fp32's metric, as slow and as large as fp32" and perfect.
    """

    fp32: Point
    quality_floor: float = 0.9

    def hypervolume(self, points: list[Point]) -> float:
        return normalised_hypervolume([(p.quality / self.fp32.quality, p.latency_ms / self.fp32.latency_ms,
                                        p.size_mb / self.fp32.size_mb) for p in points], self.quality_floor)

    def within(self, points: list[Point], points_below: float = 1.0) -> list[Point]:
        """The points at most ``points_below`` metric points (hundredths) below fp32."""
        return [p for p in points if p.quality >= self.fp32.quality - points_below / 100 - 1e-12]


@dataclass
class Run:
    """One search of one method: its points in trial order and its time figures (s)."""

    method: str
    seed: int
    budget: int
    points: list[Point]
    trial_times: list[dict[str, float]]
    search_wall_s: float
    job_wall_s: float
    workers: int
    fresh_trials: int
    extra_cost_trials: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def prefix(self, budget: int) -> Run:
        """The first ``budget`` trials of this run: what the same seed gives at that budget when the
        sampler's proposals do not depend on the total (random sampling)."""
        share = budget / max(1, self.budget)
        times = [t for t in self.trial_times if t["number"] < budget]
        return Run(self.method, self.seed, budget, [p for p in self.points if p.number < budget], times,
                   self.search_wall_s * share, self.job_wall_s * share, self.workers,
                   sum(1 for t in times if not t.get("cached")), self.extra_cost_trials,
                   {**self.notes, "plans": self.notes.get("plans", [])[:budget]})

    @property
    def trials(self) -> int:
        """Trials proposed (screened ones included; they are not among ``points``)."""
        return len(self.notes.get("plans", [])) or len(self.points)

    @property
    def fp32(self) -> Point:
        """This search's own fp32 reference (the first point when there is no labelled one)."""
        return next((p for p in self.points if p.label.endswith("(fp32)")), self.points[0])

    def reference(self, quality_floor: float) -> Reference:
        """The box of this search, relative to its own fp32: the host's speed drifts between searches
        (fp32 measured 55 to 66 ms within one benchmark), so each search is read against itself."""
        return Reference(self.fp32, quality_floor)

    def trials_per_hour(self) -> float:
        return 3600.0 * len(self.trial_times) / self.search_wall_s if self.search_wall_s > 0 else 0.0

    def time_split(self) -> dict[str, float]:
        """Mean seconds per trial of each part, and 'overhead': worker wall time not spent in them
        (Ray scheduling, loading, idle slots), per trial."""
        fresh = [t for t in self.trial_times if not t.get("cached")] or self.trial_times
        split = {part: statistics.fmean(t.get(part, 0.0) for t in fresh) for part in TIME_PARTS}
        per_trial = self.search_wall_s * self.workers / max(1, len(self.trial_times))
        split["overhead_s"] = max(0.0, per_trial - sum(split.values()))
        split["wall_per_trial_s"] = per_trial
        return split


def point_of(record: TrialRecord, metric: str) -> Point:
    """A trial's published figures: the front's latencies are its isolated re-timings."""
    m = record.metrics
    return Point(float(m[metric]), float(m["latency_ms"]), float(m["size_mb"]), record.label,
                 str(m.get("artifact", "")), record.number)


def run_search(method: str, sampler: str, seed: int, budget: int, results: Path, config: dict[str, Any],
               metric: str) -> Run:
    """One real slimtune search; front recovery off so every method is compared on its trials alone."""
    name = f"{method}-n{budget}-s{seed}"
    sections = {**config, "search": {**config.get("search", {}), "trials": budget, "sampler": sampler, "seed": seed},
                "recovery": {**config.get("recovery", {}), "mode": "off"}}
    started = time.perf_counter()
    result = api.search(sections, name=name, results_dir=results)
    job_wall = time.perf_counter() - started
    done = [r for r in result.records if r.status == "completed" and r.recovered_from is None]
    times = [{**{k: float(r.metrics.get(k, 0.0)) for k in (*TIME_PARTS, "trial_s", "started_at", "finished_at")},
              "cached": bool(r.metrics.get("cached")), "number": r.number} for r in done]
    wall = (max(t["finished_at"] for t in times) - min(t["started_at"] for t in times)) if times else job_wall
    notes = {"folder": str(result.folder),
             "plans": [json.dumps(r.params, sort_keys=True) for r in result.records if r.recovered_from is None],
             "artifacts": [{"plan": json.dumps(r.params, sort_keys=True), "sha256": str(r.metrics.get("artifact_sha256", "")),
                            # the modes change the bytes of MatMulNBits layers only
                            "kernel_modes": str(r.metrics.get("kernel_modes", ""))
                            if "MatMulNBits" in str(r.metrics.get("kernels", "")) else ""}
                           for r in done if not r.metrics.get("cached")]}
    for record in result.records:
        if record.status != "completed":
            print(f"  {name}: {record.name} {record.status}: {record.error}")
    workers = int(sections["search"].get("workers", 2))
    # screened trials are dominated by a measured point for sure; their quality is a sample's
    return Run(method, seed, budget, [point_of(r, metric) for r in done if not r.metrics.get("screened")], times, wall, job_wall, workers,
               sum(1 for t in times if not t["cached"]), notes=notes)
