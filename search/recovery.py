"""Front recovery: distill the final front's shape-changing points, measure them, add them as trials.

With ``recovery.mode: front`` trials are measured without distillation (cheap), and only the
points that reached the front and remove or factorise weights are distilled from the uncompressed
model afterwards, the fastest and the smallest alternately, at most ``recovery.front_points`` of them. Each is measured
exactly like a trial (the same artifact path, lock and figures) and becomes a trial of its own
(``recovered_from`` names the original, the param ``recovery.steps`` says how it was built), so
the front is then recomputed from all figures. Runs in the driver process, with every core the
search gave trials, while nothing else runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from slimtune.search.records import TrialListener, TrialRecord
from slimtune.search.trial import TrialContext, run_trial, worker_state


def front_to_recover(records: list[TrialRecord], pareto: set[int], ctx: TrialContext) -> list[TrialRecord]:
    """The front's points whose plan changes shapes and was not distilled: fastest and smallest alternately.

    Both ends of the front are where pruning pays, and where its lost accuracy matters most.
    """
    space = worker_state(ctx).space
    candidates = [r for r in records if r.number in pareto
                  and (plan := space.plan_from_choices(r.params)).changes_shapes and plan.recovery is None]
    by_latency = sorted(candidates, key=lambda r: float(r.metrics["latency_ms"]))
    by_size = sorted(candidates, key=lambda r: float(r.metrics["size_mb"]))
    return alternate(by_latency, by_size)[: ctx.config.recovery.front_points]


def alternate(first: list[TrialRecord], second: list[TrialRecord]) -> list[TrialRecord]:
    """first[0], second[0], first[1], second[1], ... each record once."""
    chosen: list[TrialRecord] = []
    for pair in zip(first, second, strict=True):
        for record in pair:
            if record.number not in {r.number for r in chosen}:
                chosen.append(record)
    return chosen


def recover_front(records: list[TrialRecord], pareto: set[int], ctx: TrialContext,
                  listeners: Sequence[TrialListener] = (),
                  progress: Callable[[int, int], None] | None = None) -> list[TrialRecord]:
    """Distill and measure the chosen front points; returns their new records (failed ones included).

    With ``recovery.budget_s``, each point gets an equal share of the seconds left; a point that
    stopped before its steps (budget, or a flat loss) is recorded with the steps it did and neither
    rule (``exact_params``), so its plan rebuilds the measured file. Its trial is announced to the
    listeners (the MLflow run with its params) once those params are known."""
    chosen = front_to_recover(records, pareto, ctx)
    space = worker_state(ctx).space
    budget, started = ctx.config.recovery.budget_s, time.monotonic()
    added = []
    for index, original in enumerate(chosen):
        if progress:
            progress(index, len(chosen))
        planned = {**original.params, "recovery.steps": ctx.config.recovery.steps}
        share = {} if budget is None else {
            "recovery.budget_s": max(1.0, (budget - (time.monotonic() - started)) / (len(chosen) - index))}
        record = TrialRecord(number=len(records) + index, trial_id=f"recovered-{original.trial_id}",
                             params=planned, recovered_from=original.number)
        try:
            metrics = run_trial({**planned, **share}, ctx)
            exact = exact_params(planned, int(metrics["recover_steps"]))
            # the digest of the plan that rebuilds it (plans/), not of the budgeted one that ran
            record = replace(record, status="completed", params=exact,
                             metrics={**metrics, "plan_digest": space.plan_from_choices(exact).digest})
        except Exception as exc:  # recorded as a failed trial, like any trial that raises
            record = replace(record, status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
        for listener in listeners:
            listener.trial_started(replace(record, status="running", metrics={}, error=""))
            listener.trial_finished(record)
        added.append(record)
    if progress:
        progress(len(chosen), len(chosen))
    return added


def exact_params(planned: dict[str, Any], steps_done: int) -> dict[str, Any]:
    """The params of a recovery that took ``steps_done`` steps: the planned ones when it ran them
    all (the flat rule did not fire, so it will not on a rebuild either), else exactly those steps
    with the flat rule off."""
    if steps_done >= int(planned["recovery.steps"]):
        return planned
    return {**planned, "recovery.steps": steps_done, "recovery.flat_patience": 0}
