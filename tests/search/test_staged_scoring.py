"""Staged scoring: a trial stops after the sample only when a measured point dominates it for sure."""

from __future__ import annotations

import json

import pytest
import torch

from slimtune.config import LatencyConfig, ModelConfig, SearchConfig, TaskConfig
from slimtune.evaluators.latency import latency_inputs
from slimtune.evaluators.node_lock import NodeLock
from slimtune.model import load_model
from slimtune.plan import CompressionPlan, QuantSpec
from slimtune.search.measure import PlanInputs, dominating_point, measure_plan
from slimtune.search.trial import task_calibration
from slimtune.tasks import choose_task, load_texts, prepare_task

FAST_TIMING = LatencyConfig(batch_size=2, sequence_length=32, threads=1, warmup_runs=1, timed_runs=3, min_timed_runs=3)


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


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, many_texts_csv, tmp_path_factory) -> PlanInputs:
    loaded = load_model(str(tiny_model_dir))
    model_cfg = ModelConfig(name=str(tiny_model_dir), max_length=32)
    cfg = TaskConfig(data=str(many_texts_csv), text_column="body", label_column="topic", test_fraction=0.5)
    data = load_texts(cfg)
    task, _ = prepare_task(model_cfg, cfg, choose_task(model_cfg, cfg, loaded.source, data), loaded, data,
                           tmp_path_factory.mktemp("cache"))
    return PlanInputs(loaded.module, task, task_calibration(loaded.module, task),
                      latency_inputs(task.input_ids, task.attention_mask, FAST_TIMING))


def test_the_uncompressed_export_takes_the_uncompressed_figures_once_its_sample_matches(inputs, tmp_path):
    task = inputs.task
    measured = dict(latency_cfg=FAST_TIMING, threads=1, lock=NodeLock(tmp_path / "lock"), search=SearchConfig(),
                    measured_dir=tmp_path)
    fp32 = measure_plan(inputs, CompressionPlan(), tmp_path / "fp32.onnx", **measured)
    assert fp32["screen_texts"] < len(task.input_ids) == fp32["quality_texts"] == 120
    assert fp32["quality_by_uncompressed"] == 1 and fp32["accuracy"] == pytest.approx(task.reference["accuracy"])
    linears = [n for n, m in inputs.model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    int8 = measure_plan(inputs, CompressionPlan(quantize={n: QuantSpec("int8") for n in linears}),
                        tmp_path / "int8.onnx", **measured)
    assert int8["quality_by_uncompressed"] == 0 and int8["quality_texts"] == 120  # scored on every text itself


def test_a_dominated_candidate_stops_timing_after_its_first_runs(inputs, tmp_path):
    from slimtune.evaluators.latency import EARLY_RUNS

    linears = [n for n, m in inputs.model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    plan = CompressionPlan(quantize={n: QuantSpec("int8") for n in linears})
    timing = FAST_TIMING.model_copy(update={"timed_runs": 12, "min_timed_runs": 6, "median_precision": None})
    lock = NodeLock(tmp_path / "lock")
    alone = tmp_path / "alone"
    alone.mkdir()
    first = measure_plan(inputs, plan, tmp_path / "first.onnx", timing, 1, lock, SearchConfig(), alone)
    assert first["screened"] == 0 and first["latency_runs"] == 12  # nothing measured to compare with
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    # a point better on the same sampled texts, smaller and faster than any timing can be
    _measured(crowded, "better", first["screen_score"] * 1.5 + 1.0, 1e-6, 1e-6, texts=first["screen_texts"],
              hardware=inputs.hardware.key)
    _measured(crowded, "slow", first["screen_score"] * 1.5 + 1.0, 1e9, 1e-6, texts=first["screen_texts"],
              hardware=inputs.hardware.key)
    again = measure_plan(inputs, plan, tmp_path / "again.onnx", timing, 1, lock, SearchConfig(), crowded)
    assert again["screened"] == 1 and again["screened_by"] == "better"
    assert again["latency_runs"] == EARLY_RUNS and again["quality_texts"] == again["screen_texts"]
    slower = tmp_path / "slower"
    slower.mkdir()
    _measured(slower, "slow", first["screen_score"] * 1.5 + 1.0, 1e9, 1e-6, texts=first["screen_texts"],
              hardware=inputs.hardware.key)
    timed = measure_plan(inputs, plan, tmp_path / "timed.onnx", timing, 1, lock, SearchConfig(), slower)
    assert timed["screened"] == 0 and timed["latency_runs"] == 12  # faster than the only better point: timed in full
