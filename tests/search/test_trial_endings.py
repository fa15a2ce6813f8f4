"""How trials end under real Ray: failures recorded everywhere, a time budget stops the rest cleanly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from slimtune.config import Config
from slimtune.layout import discover_layout
from slimtune.model import load_model
from slimtune.prepare import prepare
from slimtune.search.objectives import objectives
from slimtune.search.pareto import pareto_numbers
from slimtune.search.runner import run_search, start_ray
from slimtune.search.trial import TrialContext
from slimtune.spaces import SearchSpace
from slimtune.tracking import MlflowSearchRun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    start_ray(None)
    yield
    ray.shutdown()


def _children(uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_trials_that_raise_are_failed_in_ray_optuna_and_mlflow(local_ray, tiny_model_dir, tmp_path):
    config = Config.model_validate({
        "model": {"name": str(tiny_model_dir)},
        "task": {"metric": "accuracy"},
        "space": {"group_size": 2},
        "search": {"trials": 3, "workers": 1},
    })
    space = SearchSpace(discover_layout(load_model(str(tiny_model_dir)).module), config.space)
    ctx = TrialContext(config=config, model_source=str(tiny_model_dir), task_path=str(tmp_path / "missing.npz"),
                       work_dir=str(tmp_path / "work"), lock_path=str(tmp_path / "lock"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowSearchRun.create(uri, "failures", "broken", space, {"note": "task file missing"},
                              artifact_root=tmp_path / "artifacts")
    records = run_search(config, ctx, space, tmp_path / "ray", "broken", listeners=(tracker,))
    assert [r.status for r in records] == ["failed"] * 3
    assert all("missing.npz" in r.error for r in records)
    assert pareto_numbers(records, objectives("accuracy")) == set()
    children = _children(uri, "failures")
    assert len(children) == 3
    assert {r.info.status for r in children} == {"FAILED"}
    assert all("missing.npz" in r.data.tags["slimtune.error"] for r in children)
    assert not Path(tmp_path / "work" / "measured").exists()


def steady_measure(params, ctx):
    """A trial of a fixed 1.5 s with fixed figures: what is under test is how Ray's time budget ends
    a search (none left running in Ray, Optuna or MLflow), which does not depend on what a trial
    computes; real trials run in the test above and in every search test."""
    time.sleep(1.5)
    return {"accuracy": 0.5, "macro_f1": 0.5, "latency_ms": 1.0, "size_mb": 1.0}


def test_a_time_budget_ends_the_search_with_no_trial_left_running(local_ray, tiny_model_dir, tiny_config, tmp_path):
    import sys

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # The budget counts from the tuner's start, worker start-up included (several seconds on a slow
    # 2-core runner), so it leaves room for the first 1.5 s trials to complete before it ends the rest.
    config = Config.model_validate(tiny_config(search={"trials": 2000, "workers": 2, "time_budget_s": 20}))
    prepared = prepare(config, tmp_path)
    config = prepared.config
    space = SearchSpace(prepared.layout, config.space)
    ctx = TrialContext(config=config, model_source=str(tiny_model_dir), task_path=str(prepared.task_path),
                       work_dir=str(tmp_path / "work"), lock_path=str(tmp_path / "lock"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowSearchRun.create(uri, "budget", "budget", space, {}, artifact_root=tmp_path / "artifacts")
    started = time.monotonic()
    records = run_search(config, ctx, space, tmp_path / "ray", "budget", listeners=(tracker,), measure=steady_measure)
    assert time.monotonic() - started < 60
    assert 0 < len(records) < 2000
    assert {r.status for r in records} <= {"completed", "stopped"} and records[0].status == "completed"
    assert "RUNNING" not in {r.info.status for r in _children(uri, "budget")}


def test_patience_ends_a_search_that_stops_improving(local_ray, tiny_model_dir, tiny_config, tmp_path):
    from slimtune.search.front_progress import FrontProgress

    config = Config.model_validate(tiny_config(
        space={"weight_formats": ["fp32", "int8"], "ffn_sparsities": [0.0], "head_fractions": [0.0],
               "depth_fractions": [0.0], "rank_fractions": [1.0], "embedding_formats": ["fp32"]},
        search={"trials": 200, "workers": 1, "patience": 3}))
    prepared = prepare(config, tmp_path)
    space = SearchSpace(prepared.layout, prepared.config.space)
    ctx = TrialContext(config=prepared.config, model_source=str(tiny_model_dir), task_path=str(prepared.task_path),
                       work_dir=str(tmp_path / "work"), lock_path=str(tmp_path / "lock"))
    front = FrontProgress(objectives(prepared.config.task.metric), patience=3)
    records = run_search(prepared.config, ctx, space, tmp_path / "ray", "patience", front=front)
    assert front.should_stop and len(records) < 40  # a 2-group fp32/int8 space has 4 plans; repeats never gain
    assert {r.status for r in records} <= {"completed", "stopped"}
