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

from collections.abc import Callable, Sequence
from dataclasses import replace

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
    """Distill and measure the chosen front points; returns their new records (failed ones included)."""
    chosen = front_to_recover(records, pareto, ctx)
    added = []
    for index, original in enumerate(chosen):
        if progress:
            progress(index, len(chosen))
        record = TrialRecord(number=len(records) + index, trial_id=f"recovered-{original.trial_id}",
                             params={**original.params, "recovery.steps": ctx.config.recovery.steps},
                             recovered_from=original.number)
        for listener in listeners:
            listener.trial_started(record)
        try:
            record = replace(record, status="completed", metrics=run_trial(record.params, ctx))
        except Exception as exc:  # recorded as a failed trial, like any trial that raises
            record = replace(record, status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
        for listener in listeners:
            listener.trial_finished(record)
        added.append(record)
    if progress:
        progress(len(chosen), len(chosen))
    return added
