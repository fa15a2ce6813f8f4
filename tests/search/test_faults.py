"""Every kind of trial fault, injected into a real search: recorded as failed in Ray, Optuna and
MLflow with its error, and the search goes on; a store that fails now and then loses nothing."""

from __future__ import annotations

import fcntl
import math
import os
import time
from pathlib import Path

import cloudpickle
import pytest
import ray
from mlflow.tracking import MlflowClient
from rich.console import Console

from slimtune.config import Config
from slimtune.search.runner import run_search, start_ray
from slimtune.search.trial import TrialContext
from slimtune.spaces import SearchSpace
from slimtune.tracking import MlflowSearchRun
from slimtune.workflow import prepare

pytestmark = pytest.mark.slow

FAULTS = ["none", "raises", "non-finite", "timeout", "memory", "worker dies", "none", "none"]


def _next_index(work_dir: str) -> int:
    """The how-many-th trial this is, counted across worker processes."""
    path = Path(work_dir) / "fault-counter"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        index = len(handle.read())
        handle.write("x")
        return index


def faulty_measure(params, ctx):
    """The real trial, with one fault injected per trial in the order of FAULTS."""
    import numpy as np

    import slimtune.search.trial as trial
    from slimtune.evaluators import Metric

    fault = FAULTS[_next_index(ctx.work_dir) % len(FAULTS)]
    if fault == "raises":
        raise RuntimeError("injected failure")
    if fault == "timeout":
        time.sleep(600)
    if fault == "memory":
        hog = np.ones(400_000_000)  # 3.2 GB, touched
        return {"size": float(hog.sum())}
    if fault == "worker dies":
        os._exit(3)
    if fault == "non-finite":
        real = trial.StagedQuality

        class NonFinite(real):
            def first_stage(self):
                return (Metric("accuracy", math.nan, "fraction"),)

            full = first_stage

        trial.StagedQuality = NonFinite
        try:
            return trial.run_trial(params, ctx)
        finally:
            trial.StagedQuality = real
    return trial.run_trial(params, ctx)


class FlakyStore:
    """Makes the MLflow client's log_batch fail its first ``failures`` calls, as a store under load would."""

    def __init__(self, method, failures: int) -> None:
        self.method, self.failures = method, failures

    def __call__(self, *args, **kwargs):
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("injected: the store did not answer")
        return self.method(*args, **kwargs)


def test_every_fault_is_a_failed_trial_everywhere_and_the_search_goes_on(tiny_model_dir, tiny_config, tmp_path):
    import sys

    from ray.tune.search.optuna import OptunaSearch

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = Config.model_validate(tiny_config(search={"trials": len(FAULTS), "workers": 1, "trial_timeout_s": 20,
                                                       "trial_memory_mb": 2500}))
    prepared = prepare(config, tmp_path, Console(quiet=True))
    space = SearchSpace(prepared.layout, prepared.config.space)
    ctx = TrialContext(config=prepared.config, model_source=str(tiny_model_dir), task_path=str(prepared.task_path),
                       work_dir=str(tmp_path / "work"), lock_path=str(tmp_path / "lock"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowSearchRun(uri, "faults", "faults", space, {}, artifact_root=tmp_path / "artifacts")
    tracker.client._client.log_batch = FlakyStore(tracker.client._client.log_batch, failures=4)
    start_ray(None)
    try:
        records = run_search(prepared.config, ctx, space, tmp_path / "ray", "faults", listeners=(tracker,),
                             measure=faulty_measure)
    finally:
        ray.shutdown()
    tracker.finish(records, set(), None, {})

    assert [r.status for r in records] == ["completed" if f == "none" else "failed" for f in FAULTS]
    errors = dict(zip(FAULTS, (r.error for r in records), strict=True))
    assert "injected failure" in errors["raises"]
    assert "non-finite accuracy" in errors["non-finite"]
    assert errors["timeout"].startswith("TrialTimeout") and errors["memory"].startswith("TrialOutOfMemory")
    assert errors["worker dies"]

    searcher = OptunaSearch()
    searcher.restore_from_dir(str(tmp_path / "ray" / "faults"))
    states = [t.state.name for t in searcher._ot_study.trials]
    assert states == ["COMPLETE" if f == "none" else "FAIL" for f in FAULTS]

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.run_name)
    assert [c.info.status for c in children] == ["FINISHED" if f == "none" else "FAILED" for f in FAULTS]
    assert children[0].data.params and "accuracy" in children[0].data.metrics  # lost at first, logged at the end
    assert all(c.data.tags["slimtune.error"] == r.error[:4000] for c, r in zip(children, records, strict=True)
               if r.status == "failed")
    assert not tracker.unsynced
    for fault, record, state, run in zip(FAULTS, records, states, children, strict=True):  # shown with pytest -s
        print(f"| {fault} | {record.status} | {state} | {run.info.status} | {record.error[:90]} |")
