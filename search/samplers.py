"""The Optuna samplers a search can use, in a form Ray Tune can pickle.

Ray Tune pickles the searcher, and with it the sampler, into the experiment's state when the
search starts and into every searcher checkpoint (what ``--resume`` reads). Optuna 5.1's genetic
samplers (NSGA-II, NSGA-III) hold a ``threading.Lock``, which cannot be pickled, so a search
with them failed before its first trial. ``Picklable`` is the same sampler with its locks left out
of the pickled state and made anew when it is loaded: a lock guards one process's threads and
means nothing in another.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import optuna

from slimtune.config import Config

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))
_LOCKS_KEY = "_slimtune_locks"  # the pickled state's list of (attribute, is reentrant)


class _LocksMadeAnew:
    """Mixin: pickle an object without its lock attributes and give it fresh ones on load."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(vars(self))
        locks = [(name, not isinstance(value, _LOCK_TYPES[0]))
                 for name, value in state.items() if isinstance(value, _LOCK_TYPES)]
        for name, _ in locks:
            del state[name]
        state[_LOCKS_KEY] = locks
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for name, reentrant in state.pop(_LOCKS_KEY, []):
            state[name] = threading.RLock() if reentrant else threading.Lock()
        vars(self).update(state)


class PicklableNSGAIISampler(_LocksMadeAnew, optuna.samplers.NSGAIISampler):
    """``optuna.samplers.NSGAIISampler`` that Ray Tune can pickle (see module doc)."""


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's log at warnings inside the block, as it was after: it announces every study and
    trial at INFO, which would run over the progress display."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def make_sampler(config: Config) -> optuna.samplers.BaseSampler:
    """The sampler ``search.sampler`` names, seeded with ``search.seed``."""
    search = config.search
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=search.seed)
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=search.seed, multivariate=True, n_startup_trials=max(4, search.trials // 4))
    # A generation small enough that short searches still evolve (several generations per search).
    population = max(4, min(50, search.trials // 3))
    return PicklableNSGAIISampler(seed=search.seed, population_size=population)
