"""Hypervolume relative to the search's own fp32, and patience."""

from __future__ import annotations

import pytest

from slimtune.search.front_progress import FrontProgress, hypervolume
from slimtune.search.objectives import objectives
from slimtune.search.records import TrialRecord

GOALS = objectives("accuracy")


def _record(number, accuracy, latency, size, reference="", status="completed"):
    return TrialRecord(number=number, trial_id=str(number), params={}, status=status, reference=reference,
                       metrics={"accuracy": accuracy, "latency_ms": latency, "size_mb": size, "hardware": "cpu"})


def test_hypervolume_is_the_box_each_point_dominates_relative_to_fp32():
    fp32 = _record(0, 0.90, 100.0, 80.0, reference="fp32")
    assert hypervolume([fp32], GOALS) == 0.0  # no faster, no smaller than itself: nothing
    int8 = _record(1, 0.891, 40.0, 20.0)  # 99% of fp32's accuracy, 0.4x latency, 0.25x size
    assert hypervolume([fp32, int8], GOALS) == pytest.approx(0.99 * 0.6 * 0.75)
    dominated = _record(2, 0.80, 50.0, 30.0)
    assert hypervolume([fp32, int8, dominated], GOALS) == pytest.approx(0.99 * 0.6 * 0.75)
    assert hypervolume([int8], GOALS) == 0.0  # without the fp32 reference there is no scale


def test_patience_counts_finished_trials_without_gain():
    front = FrontProgress(GOALS, patience=2)
    steps = []
    front.on_change = lambda value, step: steps.append(step)
    front.trial_finished(_record(0, 0.90, 100.0, 80.0, reference="fp32"))
    front.trial_finished(_record(1, 0.891, 40.0, 20.0))
    assert front.since_improvement == 0 and not front.should_stop
    front.trial_finished(_record(2, 0.80, 50.0, 30.0))  # dominated
    front.trial_finished(_record(3, 0, 0, 0, status="failed"))
    assert front.should_stop and steps == [1, 2, 3]
    assert "on_change" in front.__getstate__() and front.__getstate__()["on_change"] is None
