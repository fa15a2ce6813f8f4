"""A cluster search whose space offers blockwise formats starts measuring its kernel modes with its
first trials, as a Ray task on every node, so a later 4-bit trial finds them measured; a local
search's trials take the modes its driver measured before the search."""

from __future__ import annotations

import json

import pytest
import ray

from slimtune.config import Config
from slimtune.prepare import machine_kernel_modes, prepare
from slimtune.search.runner import start_kernel_modes, start_ray, stop_tasks
from slimtune.search.trial import TrialContext, trial_modes

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


def test_a_local_search_takes_the_modes_its_driver_measured(tiny_config, tmp_path, monkeypatch):
    import slimtune.search.trial as trial

    config = Config.model_validate(tiny_config(space={"group_size": 2, "block_sizes": [32], "int4_methods": ["rtn"]}))
    prepared = prepare(config, tmp_path / "results")
    measured = machine_kernel_modes(prepared, tmp_path / "results")
    ctx = TrialContext(config=prepared.config, model_source=prepared.loaded.source, task_path=str(prepared.task_path),
                       work_dir=str(tmp_path / "work"), lock_path=str(tmp_path / "lock"),
                       known_modes=((measured.key, measured.record()),))

    def refuse(*args, **kwargs):
        raise AssertionError("the driver's modes are taken, not measured again")

    monkeypatch.setattr(trial, "measured_modes", refuse)
    assert start_kernel_modes(ctx) == []  # no task: nothing left to measure (and no Ray needed to say so)
    assert trial_modes(ctx, ctx.lock_path) == (measured.modes, measured.figures)
    other = TrialContext(**{**ctx.__dict__, "known_modes": (("another machine's key", measured.record()),)})
    with pytest.raises(AssertionError, match="not measured again"):  # not this node's: it measures its own
        trial_modes(other, other.lock_path)


def test_a_driver_that_measured_before_ray_started_names_its_ray_node_after():
    """The driver measures its kernel modes before Ray starts; the points it measures later (front
    recovery) must name the Ray node that the front's re-timing runs them on, not the host."""
    from slimtune.evaluators.hardware import current_target

    if ray.is_initialized():
        ray.shutdown()
    before = current_target()
    start_ray(None)
    try:
        after = current_target()
        assert after.node == ray.get_runtime_context().get_node_id() != before.node
        assert after.key == before.key  # the same target: only the node's name changed
    finally:
        ray.shutdown()
