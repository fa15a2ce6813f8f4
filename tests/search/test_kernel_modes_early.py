"""A search whose space offers blockwise formats starts measuring its kernel modes with its first
trials, as a Ray task on every node, so a later 4-bit trial finds them measured."""

from __future__ import annotations

import json

import pytest
import ray

from slimtune.config import Config
from slimtune.prepare import prepare
from slimtune.search.runner import start_kernel_modes, start_ray, stop_tasks
from slimtune.search.trial import TrialContext

pytestmark = pytest.mark.slow


def test_the_modes_are_measured_on_the_node_as_the_search_starts(tiny_config, tmp_path):
    config = Config.model_validate(tiny_config(space={"group_size": 2, "block_sizes": [32], "int4_methods": ["rtn"]}))
    prepared = prepare(config, tmp_path / "results")
    ctx = TrialContext(config=prepared.config, model_source=prepared.loaded.source, task_path=str(prepared.task_path),
                       work_dir=str(tmp_path / "work"), lock_path=str(tmp_path / "lock"))
    no_blockwise = TrialContext(**{**ctx.__dict__, "config": prepared.config.model_copy(
        update={"space": prepared.config.space.model_copy(update={"weight_formats": ("fp32", "int8")})})})
    start_ray(None)
    try:
        assert start_kernel_modes(no_blockwise) == []  # nothing to measure: no task
        tasks = start_kernel_modes(ctx)
        assert len(tasks) == 1  # one node here
        ray.get(tasks)
        stop_tasks(tasks)  # all ended: nothing to stop
    finally:
        ray.shutdown()
    (cache,) = (tmp_path / "work" / "kernel-modes").glob("*.json")
    measured = json.loads(cache.read_text())
    assert {(f["level"], f["symmetric"]) for f in measured["figures"]} == {(0, False), (4, False), (0, True), (4, True)}
