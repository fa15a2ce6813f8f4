"""The published front is timed again in isolation, until it is stable."""

from __future__ import annotations

import numpy as np

from slimtune.config import LatencyConfig
from slimtune.evaluators.node_lock import NodeLock
from slimtune.export import build_artifact
from slimtune.plan import CompressionPlan
from slimtune.search.records import TrialRecord
from slimtune.search.remeasure import remeasure_front
from slimtune.search.trial import objectives


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
    updated, front = remeasure_front(records, objectives("accuracy"), feeds, cfg, NodeLock(tmp_path / "lock"),
                                     on_remeasured=lambda r: seen.append(r.number))
    assert seen == [0, 1]  # trial number order; 2 never reached the front
    first, second, third = updated
    assert first.metrics["search_latency_ms"] == 1e-6 and first.metrics["latency_ms"] > 1e-3
    assert second.metrics["remeasured"] == 1 and "remeasured" not in third.metrics
    assert front == ({0} if first.metrics["latency_ms"] < second.metrics["latency_ms"] else {1})
