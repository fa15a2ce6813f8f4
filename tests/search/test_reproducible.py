"""Same seed, configuration and number of workers: the same plans, in the same order, however the
trials' durations make them end."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import cloudpickle
import pytest
import ray

from slimtune.config import Config
from slimtune.prepare import prepare
from slimtune.search.runner import run_search, start_ray
from slimtune.search.trial import TrialContext
from slimtune.spaces import SearchSpace

pytestmark = pytest.mark.slow


def jittered_measure(params, ctx):
    """Figures that depend on the plan only, after a random delay (from the OS, not any seed), so
    trials end in a different order each search."""
    time.sleep(int.from_bytes(os.urandom(1), "little") / 255 * 0.6)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).digest()
    quality, latency, size = (b / 255 for b in digest[:3])
    return {"accuracy": quality, "latency_ms": 1 + 10 * latency, "size_mb": 1 + 10 * size, "plan": json.dumps(params)}


def _plans(config: Config, tmp_path, name: str) -> list[dict]:
    prepared = prepare(config, tmp_path)
    space = SearchSpace(prepared.layout, prepared.config.space)
    ctx = TrialContext(config=prepared.config, model_source=prepared.loaded.source,
                       task_path=str(prepared.task_path), work_dir=str(tmp_path / name), lock_path=str(tmp_path / "lock"))
    records = run_search(prepared.config, ctx, space, tmp_path / "ray", name, measure=jittered_measure)
    assert all(r.status == "completed" for r in records)
    return [r.params for r in records]


@pytest.mark.parametrize("sampler", ["nsga2", "tpe"])
def test_the_same_seed_proposes_the_same_plans_with_parallel_workers(sampler, tiny_config, tmp_path):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = Config.model_validate(tiny_config(space={"group_size": 1}, search={
        "trials": 12, "workers": 3, "seed": 5, "sampler": sampler, "cpus_per_trial": 0.5}))
    start_ray(None)
    try:
        first, second = (_plans(config, tmp_path, f"run{i}") for i in (1, 2))
    finally:
        ray.shutdown()
    assert len(first) == 12
    differ = [i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b]
    assert first == second, f"plans differ at trials {differ}"
    assert len({json.dumps(p, sort_keys=True) for p in first}) > 8  # the sampler did explore
