"""A search's steps after its trials, on the front: distillation recovery of its shape-changing
points, their latency timed again in isolation (the published figures), and its ONNX files kept.
Each shows its progress as a ``Phase`` and says what it did in one line."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from rich.console import Console

from slimtune.config import Config
from slimtune.phases import Phase
from slimtune.plots import ONE_CLICK
from slimtune.search.records import TrialRecord
from slimtune.tasks import PreparedTask

BASELINES = ("fp32", *ONE_CLICK)
"""The reference points a front is read against: re-timed with it (``remeasure_front``'s ``baselines``)."""


def keep_front_artifacts(records: list[TrialRecord], pareto: set[int], models_dir: Path) -> None:
    """Bring the front's ONNX files to ``models_dir``: copied when this machine holds the file (an
    artifact's name is the digest of everything it was built from), else fetched through Ray from
    the node that built it."""
    import ray

    from slimtune.search.shipping import on_node, read_bytes

    models_dir.mkdir(parents=True, exist_ok=True)
    for record in records:
        artifact, node = record.metrics.get("artifact"), record.metrics.get("node")
        if record.number not in pareto or not artifact:
            continue
        if Path(artifact).is_file():
            shutil.copy2(artifact, models_dir / f"{record.name}.onnx")
        elif ray.is_initialized() and node:
            (models_dir / f"{record.name}.onnx").write_bytes(on_node(node, read_bytes, artifact))


def recover_front_points(records: list[TrialRecord], ctx, tracker, console: Console) -> list[TrialRecord]:
    """Distill the front's shape-changing points (recovery mode 'front'), with a progress bar."""
    from slimtune.search.objectives import objectives
    from slimtune.search.pareto import pareto_numbers
    from slimtune.search.recovery import recover_front
    from slimtune.transforms.distill import reporting_steps

    recovery_ctx = dataclasses.replace(ctx, config=ctx.config.model_copy(update={"search": ctx.config.search.model_copy(
        update={"cpus_per_trial": float(os.cpu_count() or 1)})}))  # nothing else runs now: every core
    points = {"done": 0, "total": 0}

    def point_done(done: int, total: int) -> None:
        points.update(done=done, total=total)
        phase.update(done, total, "front points distilled")

    def step(done: int, steps: int, loss: float, seconds_left: float) -> None:
        phase.update(points["done"], points["total"] or None, f"point {points['done'] + 1}: step {done}/{steps}, "
                     f"loss {loss:.4g}, about {seconds_left:.0f} s left")

    with Phase(console, f"distillation recovery of front points (up to {ctx.config.recovery.steps} steps each)") \
            as phase, reporting_steps(step):
        added = recover_front(records, pareto_numbers(records, objectives(ctx.config.task.metric)), recovery_ctx,
                              listeners=(tracker,), progress=point_done)
    done = [r for r in added if r.status == "completed"]
    seconds = ", ".join(f"{r.metrics['recover_s']:.0f}" for r in done)
    console.print(f"recovery: {len(done)} of {len(added)} front points distilled and re-measured"
                  + (f" ({seconds} s each)" if done else ""))
    return added


def remeasure_front_points(records: list[TrialRecord], goals, task: PreparedTask, config: Config, tracker,
                     console: Console) -> tuple[list[TrialRecord], set[int]]:
    """Time the front's artifacts again, one at a time, nothing else running, each on the node that
    built it; publish that front."""
    import statistics

    import ray

    from slimtune.evaluators.latency import latency_inputs
    from slimtune.evaluators.node_lock import default_lock_path
    from slimtune.search.remeasure import isolated_latency, remeasure_front
    from slimtune.search.shipping import on_node

    feeds = latency_inputs(task.input_ids, task.attention_mask, config.latency)
    lock = str(default_lock_path())

    def retime(record: TrialRecord) -> dict[str, float]:
        node, artifact = record.metrics.get("node"), record.metrics["artifact"]
        if ray.is_initialized() and node:
            return on_node(node, isolated_latency, artifact, feeds, config.latency, lock)
        return isolated_latency(artifact, feeds, config.latency, lock)

    baselines = frozenset(r.number for r in records if r.status == "completed" and r.reference in BASELINES)
    with Phase(console, "re-measuring the front's latency in isolation") as phase:
        records, pareto = remeasure_front(records, goals, retime, tracker.trial_remeasured,
                                          progress=lambda done: phase.update(done, detail="points timed"),
                                          baselines=baselines)
    changes = [r.metrics["latency_ms"] / r.metrics["search_latency_ms"] for r in records if r.metrics.get("remeasured")]
    if changes:
        console.print(f"front and references re-measured in isolation: {len(changes)} points, latency "
                      f"x{statistics.median(changes):.2f} of the search-time figure (median; range "
                      f"{min(changes):.2f}-{max(changes):.2f})")
    return records, pareto
