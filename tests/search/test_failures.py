"""Failing trials are recorded as failed everywhere and the search goes on (real Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from slimtune.config import Config
from slimtune.layout import discover_layout
from slimtune.model import load_encoder
from slimtune.search.pareto import pareto_numbers
from slimtune.search.runner import run_search, start_ray
from slimtune.search.trial import TrialContext
from slimtune.spaces import SearchSpace
from slimtune.tracking import MlflowSearchRun

pytestmark = pytest.mark.slow


def test_trials_that_raise_are_failed_in_ray_optuna_and_mlflow(tiny_model_dir, tmp_path):
    config = Config.model_validate({
        "model": {"name": str(tiny_model_dir)},
        "space": {"group_size": 2},
        "search": {"trials": 3, "workers": 1},
    })
    space = SearchSpace(discover_layout(load_encoder(str(tiny_model_dir)).encoder), config.space)
    ctx = TrialContext(config=config, model_source=str(tiny_model_dir), task_path=str(tmp_path / "missing.npz"),
                       work_dir=str(tmp_path / "work"), lock_path=str(tmp_path / "lock"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowSearchRun(uri, "failures", "broken", space, {"note": "task file missing"},
                              artifact_root=tmp_path / "artifacts")
    start_ray(None)
    try:
        records = run_search(config, ctx, space, tmp_path / "ray", "broken", listeners=(tracker,))
    finally:
        ray.shutdown()
    assert [r.status for r in records] == ["failed"] * 3
    assert all("missing.npz" in r.error for r in records)
    assert pareto_numbers(records) == set()
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("failures").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3
    assert {r.info.status for r in children} == {"FAILED"}
    assert all("missing.npz" in r.data.tags["slimtune.error"] for r in children)
    assert not Path(tmp_path / "work" / "measured").exists()
