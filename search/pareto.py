"""The Pareto front of a search, computed by Optuna's own non-dominated sorting.

Completed trials are added to an in-memory multi-objective study (maximise accuracy, minimise
latency and size); its ``best_trials`` are the front. A plan measured twice (a repeated proposal)
counts once, at its first trial.
"""

from __future__ import annotations

import optuna

from slimtune.search.records import TrialRecord
from slimtune.search.trial import OBJECTIVES

_DIRECTION = {"max": optuna.study.StudyDirection.MAXIMIZE, "min": optuna.study.StudyDirection.MINIMIZE}


def pareto_numbers(records: list[TrialRecord]) -> set[int]:
    """Numbers of the completed, first-of-their-plan trials that no other trial dominates."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seen: set[str] = set()
    study = optuna.create_study(directions=[_DIRECTION[mode] for _, mode in OBJECTIVES])
    for record in records:
        digest = record.metrics.get("plan_digest")
        if record.status != "completed" or digest in seen:
            continue
        seen.add(digest)
        study.add_trial(optuna.trial.create_trial(values=list(record.objectives), user_attrs={"number": record.number}))
    return {trial.user_attrs["number"] for trial in study.best_trials} if study.trials else set()
