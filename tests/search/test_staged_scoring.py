"""Staged scoring: a trial stops after the sample only when a measured point dominates it for sure."""

from __future__ import annotations

import json

from slimtune.search.measure import dominating_point


def _measured(folder, name, score, latency, size, texts=100, hardware="cpu-a"):
    (folder / f"{name}.json").write_text(json.dumps({"screen_score": score, "screen_texts": texts,
                                                     "latency_ms": latency, "size_mb": size, "hardware": hardware}))


def test_only_a_point_as_fast_as_small_and_clearly_better_on_the_same_texts_screens(tmp_path):
    _measured(tmp_path, "int8", 0.95, 20.0, 23.0)
    check = dict(measured_dir=tmp_path, goal="max", texts=100, margin=0.02, hardware="cpu-a")
    assert dominating_point(screen_score=0.80, latency_ms=25.0, size_mb=30.0, **check) == "int8"
    assert dominating_point(screen_score=0.94, latency_ms=25.0, size_mb=30.0, **check) is None  # within the margin
    assert dominating_point(screen_score=0.80, latency_ms=15.0, size_mb=30.0, **check) is None  # faster
    assert dominating_point(screen_score=0.80, latency_ms=25.0, size_mb=20.0, **check) is None  # smaller
    assert dominating_point(**{**check, "texts": 50}, screen_score=0.80, latency_ms=25.0, size_mb=30.0) is None
    assert dominating_point(**{**check, "hardware": "cpu-b"}, screen_score=0.80, latency_ms=25.0, size_mb=30.0) is None


def test_a_minimised_metric_screens_the_other_way(tmp_path):
    _measured(tmp_path, "int4", 10.0, 20.0, 23.0)
    check = dict(measured_dir=tmp_path, goal="min", texts=100, margin=0.02, hardware="cpu-a", latency_ms=30.0,
                 size_mb=30.0)
    assert dominating_point(screen_score=12.0, **check) == "int4"
    assert dominating_point(screen_score=10.1, **check) is None
