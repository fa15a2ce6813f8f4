"""The Pareto front of a search, computed by Optuna's own non-dominated sorting.

Completed trials are added to an in-memory multi-objective study (the task's metric towards its
goal, latency and size down); its ``best_trials`` are the front. A plan measured twice (a
repeated proposal) counts once, at its first trial. Each hardware target has a front of its own.
"""

from __future__ import annotations

import optuna

from slimtune.search.objectives import Objectives
from slimtune.search.records import TrialRecord
from slimtune.search.samplers import quiet_optuna

_DIRECTION = {"max": optuna.study.StudyDirection.MAXIMIZE, "min": optuna.study.StudyDirection.MINIMIZE}


def hardware_targets(records: list[TrialRecord]) -> list[str]:
    """The hardware targets completed trials were measured on (``evaluators/hardware.py``), in order seen."""
    return list(dict.fromkeys(str(r.metrics.get("hardware", "")) for r in records if r.status == "completed"))


def pareto_numbers(records: list[TrialRecord], objectives: Objectives) -> set[int]:
    """Numbers of the completed, first-of-their-plan trials that no other trial dominates.

    Screened trials (staged scoring stopped them: a measured point dominates them for sure) are not
    candidates; their quality figures are a sample's.

    Latencies of different hardware targets are not comparable: with several targets, the front is
    computed per target and the fronts are joined.
    """
    front: set[int] = set()
    for target in hardware_targets(records):
        seen: set[str] = set()
        with quiet_optuna():
            study = optuna.create_study(directions=[_DIRECTION[mode] for _, mode in objectives])
        for record in records:
            digest = record.metrics.get("plan_digest")
            if (record.status != "completed" or digest in seen or record.metrics.get("screened")
                    or str(record.metrics.get("hardware", "")) != target):
                continue
            seen.add(digest)
            study.add_trial(optuna.trial.create_trial(values=list(record.values(objectives)),
                                                      user_attrs={"number": record.number}))
        front |= {trial.user_attrs["number"] for trial in study.best_trials}
    return front


def not_faster_numbers(records: list[TrialRecord]) -> set[int]:
    """Completed compressed trials whose latency is not below the fp32 reference's, measured in the same search.

    "Compressed but not faster" is the most common surprise with compression on CPU (4-bit weights
    at encoder batch sizes, mixed formats): these trials are flagged wherever trials are shown.
    Empty when the search has no completed fp32 reference.
    """
    fp32 = [r for r in records if r.reference == "fp32" and r.status == "completed"]
    if not fp32:
        return set()
    baseline = float(fp32[0].metrics["latency_ms"])
    return {r.number for r in records if r.status == "completed" and r.reference != "fp32"
            and float(r.metrics["latency_ms"]) >= baseline}
