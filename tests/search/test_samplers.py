"""Every sampler a search can name survives Ray Tune's pickling and samples as it did before."""

import threading

import optuna
import pytest
from ray import cloudpickle

from slimtune.config import Config
from slimtune.search.samplers import PicklableNSGAIISampler, make_sampler


def _proposals(sampler: optuna.samplers.BaseSampler, trials: int) -> list[tuple[float, float]]:
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for _ in range(trials):
        trial = study.ask()
        x, y = trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)
        study.tell(trial, [x, (1 - x) ** 2 + y])
    return [tuple(t.params.values()) for t in study.trials]


@pytest.mark.parametrize("name", ["nsga2", "tpe", "random"])
def test_each_sampler_pickles_and_proposes_what_the_original_would(tiny_config, name):
    config = Config.model_validate(tiny_config(search={"sampler": name, "trials": 12, "seed": 5}))
    original, copy = make_sampler(config), cloudpickle.loads(cloudpickle.dumps(make_sampler(config)))
    assert type(copy) is type(original)
    assert _proposals(copy, 12) == _proposals(original, 12)


def test_locks_are_left_out_of_the_pickle_and_made_anew():
    sampler = PicklableNSGAIISampler(seed=1, population_size=4)
    sampler._thread_lock, sampler._reentrant = threading.Lock(), threading.RLock()
    sampler._thread_lock.acquire()  # a held lock must not come back held
    copy = cloudpickle.loads(cloudpickle.dumps(sampler))
    assert copy._thread_lock.acquire(blocking=False)
    assert type(copy._reentrant) is type(threading.RLock())
    assert "_slimtune_locks" not in vars(copy)


def test_optuna_and_ray_settings_are_scoped(monkeypatch):
    """The search quiets Optuna and sets Ray's output inside its own block only: the caller's
    settings come back as they were."""
    import os

    import optuna

    from slimtune.search.runner import RAY_OUTPUT, ray_output_settings
    from slimtune.search.samplers import quiet_optuna

    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    with quiet_optuna():
        assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    optuna.logging.set_verbosity(optuna.logging.INFO)
    name, value = next(iter(RAY_OUTPUT.items()))
    monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")  # the caller's own setting wins and stays
    with ray_output_settings():
        assert os.environ[name] == value and os.environ["RAY_DEDUP_LOGS"] == "1"
    assert name not in os.environ and os.environ["RAY_DEDUP_LOGS"] == "1"
