"""The published front is timed again in isolation, until it is stable."""

from __future__ import annotations

import numpy as np

from slimtune.config import LatencyConfig
from slimtune.export import build_artifact
from slimtune.plan import CompressionPlan
from slimtune.search.objectives import objectives
from slimtune.search.records import TrialRecord
from slimtune.search.remeasure import isolated_latency, remeasure_front


def test_front_points_are_retimed_and_points_that_join_the_front_too(bert, tmp_path):
    artifact = build_artifact(bert, CompressionPlan(), tmp_path / "m.onnx").path
    ids = np.ones((2, 16), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def record(number, latency, size):
        return TrialRecord(number=number, trial_id=str(number), params={}, status="completed", metrics={
            "accuracy": 0.9, "latency_ms": latency, "latency_p90_ms": latency, "latency_spread": 0.0,
            "size_mb": size, "plan_digest": str(number), "artifact": str(artifact), "hardware": "cpu"})

    # Search-time figures too fast to be true: 0 dominates 1; once 0 is timed for real, 1 joins the front.
    records = [record(0, 1e-6, 1.0), record(1, 2e-6, 1.0), record(2, 1e6, 2.0)]
    seen = []
    cfg = LatencyConfig(batch_size=2, sequence_length=16, threads=1, warmup_runs=1, timed_runs=3)
    retime = lambda record: isolated_latency(record.metrics["artifact"], feeds, cfg, str(tmp_path / "lock"))  # noqa: E731
    updated, front = remeasure_front(records, objectives("accuracy"), retime, on_remeasured=lambda r: seen.append(r.number))
    assert seen == [0, 1]  # trial number order; 2 never reached the front
    first, second, third = updated
    assert first.metrics["search_latency_ms"] == 1e-6 and first.metrics["latency_ms"] > 1e-3
    assert second.metrics["remeasured"] == 1 and "remeasured" not in third.metrics
    assert front == ({0} if first.metrics["latency_ms"] < second.metrics["latency_ms"] else {1})


def test_a_point_that_cannot_be_retimed_keeps_its_search_time_figures():
    def record(number, latency):
        return TrialRecord(number=number, trial_id=str(number), params={}, status="completed", metrics={
            "accuracy": 0.9, "latency_ms": latency, "latency_p90_ms": latency, "latency_spread": 0.0, "size_mb": 1.0,
            "plan_digest": str(number), "artifact": "/gone.onnx", "hardware": "cpu"})

    def lost(record):
        raise FileNotFoundError(record.metrics["artifact"])

    updated, front = remeasure_front([record(0, 5.0)], objectives("accuracy"), lost)
    assert front == {0} and updated[0].metrics["latency_ms"] == 5.0 and "remeasured" not in updated[0].metrics


def test_the_references_a_front_is_read_against_are_retimed_with_it():
    def record(number, latency, accuracy, reference=""):
        return TrialRecord(number=number, trial_id=str(number), params={}, status="completed", reference=reference,
                           metrics={"accuracy": accuracy, "latency_ms": latency, "latency_p90_ms": latency,
                                    "latency_spread": 0.0, "size_mb": 1.0, "plan_digest": str(number),
                                    "artifact": f"/m{number}.onnx", "hardware": "cpu"})

    # fp32 (0) is dominated by 2; 1 is dominated too and no baseline: never re-timed
    records = [record(0, 10.0, 0.9, "fp32"), record(1, 9.0, 0.8), record(2, 5.0, 0.95)]
    timed = []

    def retime(record):
        timed.append(record.number)
        return {"latency_ms": record.metrics["latency_ms"] / 2, "latency_p90_ms": 1.0, "latency_spread": 0.0}

    updated, front = remeasure_front(records, objectives("accuracy"), retime, baselines=frozenset({0, 7}))
    assert timed == [0, 2] and front == {2}  # trial-number order; 7 is no record here
    assert updated[0].metrics["latency_ms"] == 5.0 and updated[0].metrics["search_latency_ms"] == 10.0
    assert "remeasured" not in updated[1].metrics
