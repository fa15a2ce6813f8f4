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

from slimtune.config import Config
from slimtune.prepare import prepare
from slimtune.search.runner import run_search, start_ray
from slimtune.search.trial import TrialContext
from slimtune.spaces import SearchSpace
from slimtune.tracking import MlflowSearchRun

pytestmark = pytest.mark.slow

# A worker with the tiny model holds about 0.8 GB after a real trial; the memory fault adds 100 MB at a
# time until it passes this limit: 1 GB more, well within the timeout where first-touch page faults run
# at 0.1 GB/s (as on one VM here), where a single 3.2 GB allocation took longer than the timeout.
MEMORY_LIMIT_MB = 1800
FAULTS = ["none", "raises", "non-finite", "timeout", "memory", "worker dies", "none", "none"]


def _take_fault(work_dir: str) -> str:
    """The next fault of FAULTS, in the order trials start across worker processes, written down
    beside the Ray trial id that got it (``injected_faults``)."""
    from ray import tune

    path = Path(work_dir) / "injected-faults"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        fault = FAULTS[len(handle.read().splitlines()) % len(FAULTS)]
        handle.write(f"{tune.get_context().get_trial_id()}\t{fault}\n")
        handle.flush()
        return fault


def injected_faults(work_dir: Path) -> dict[str, str]:
    """Ray trial id -> the fault its trial got."""
    return dict(line.split("\t") for line in (work_dir / "injected-faults").read_text().splitlines())


def faulty_measure(params, ctx):
    """The real trial, with one fault of FAULTS injected into each trial."""
    import numpy as np

    import slimtune.search.measure as measure
    from slimtune.evaluators import Metric
    from slimtune.search.trial import run_trial

    fault = _take_fault(ctx.work_dir)
    if fault == "raises":
        raise RuntimeError("injected failure")
    if fault == "timeout":
        time.sleep(600)
    if fault == "memory":  # 100 MB more, touched, every 0.1 s, until the watchdog ends the worker
        hog = []
        for _ in range(30):
            hog.append(np.ones(12_500_000))
            time.sleep(0.1)
        return {"size": float(sum(h.sum() for h in hog))}
    if fault == "worker dies":
        os._exit(3)
    if fault == "non-finite":
        real = measure.StagedQuality

        class NonFinite(real):
            def first_stage(self, uncompressed_check: int = 0):
                return (Metric("accuracy", math.nan, "fraction"),)

            def full(self):
                return self.first_stage()

        measure.StagedQuality = NonFinite
        try:
            return run_trial(params, ctx)
        finally:
            measure.StagedQuality = real
    return run_trial(params, ctx)


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
    # two workers: the timeout and the worker's death are waited out while the other trials go on
    config = Config.model_validate(tiny_config(search={"trials": len(FAULTS), "workers": 2, "trial_timeout_s": 20,
                                                       "trial_memory_mb": MEMORY_LIMIT_MB}))
    prepared = prepare(config, tmp_path)
    space = SearchSpace(prepared.layout, prepared.config.space)
    ctx = TrialContext(config=prepared.config, model_source=str(tiny_model_dir), task_path=str(prepared.task_path),
                       work_dir=str(tmp_path / "work"), lock_path=str(tmp_path / "lock"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowSearchRun.create(uri, "faults", "faults", space, {}, artifact_root=tmp_path / "artifacts")
    tracker.client._client.log_batch = FlakyStore(tracker.client._client.log_batch, failures=4)
    start_ray(None)
    try:
        records = run_search(prepared.config, ctx, space, tmp_path / "ray", "faults", listeners=(tracker,),
                             measure=faulty_measure)
    finally:
        ray.shutdown()
    tracker.finish(records, set(), None, {})

    faults = [injected_faults(tmp_path / "work")[r.trial_id] for r in records]  # in the records' (start) order
    assert sorted(faults) == sorted(FAULTS)
    assert [r.status for r in records] == ["completed" if f == "none" else "failed" for f in faults]
    errors = dict(zip(faults, (r.error for r in records), strict=True))
    assert "injected failure" in errors["raises"]
    assert "non-finite accuracy" in errors["non-finite"]
    assert errors["timeout"].startswith("TrialTimeout") and errors["memory"].startswith("TrialOutOfMemory")
    assert errors["worker dies"]

    searcher = OptunaSearch()
    searcher.restore_from_dir(str(tmp_path / "ray" / "faults"))
    states = [t.state.name for t in searcher._ot_study.trials]
    assert states == ["COMPLETE" if f == "none" else "FAIL" for f in faults]

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.run_name)
    assert [c.info.status for c in children] == ["FINISHED" if f == "none" else "FAILED" for f in faults]
    assert all(c.data.params and "accuracy" in c.data.metrics  # the first ones lost at first, logged at the end
               for c, f in zip(children, faults, strict=True) if f == "none")
    assert all(c.data.tags["slimtune.error"] == r.error[:4000] for c, r in zip(children, records, strict=True)
               if r.status == "failed")
    assert not tracker.unsynced
    for fault, record, state, run in zip(faults, records, states, children, strict=True):  # shown with pytest -s
        print(f"| {fault} | {record.status} | {state} | {run.info.status} | {record.error[:90]} |")
