"""Reproducible proposals with parallel workers: Optuna learns of finished trials in trial order.

With several workers, trials end in an order that depends on the machine (a slow export, a busy
core). Ray Tune's ``OptunaSearch`` tells Optuna of each trial as it ends, so the sampler's view
when it proposes trial k, and with it the plan, depended on timing: two searches with the same
seed proposed different plans. Here trial k is proposed after exactly trials 0 .. k-lag-1 have
been told, in their order, and no others: the sequence of plans depends on the seed, the
configuration and the lag only. The price is a wait when an old trial is still running while
newer ones have ended (its slot idles until it ends). The search runs with a lag of the number of
workers plus one: with a lag of exactly the workers, one long trial (the fp32 reference, a GPTQ
build) that outlasted two of the other slot's short ones (a screened plan, a repeated one) idled
that slot, and Ray Tune, which keeps at most one idle trial actor while no trial is staged, then
ended the other worker's actor, so the next trial paid a new process and the model's load again
(7 and 9 s of an idle slot, twice in a 30-trial search on a 2-core AMD EPYC). An enqueued
plan that fixes every value the space asks for (the reference points, the sensitivity seeds) is
proposed without that wait: the sampler proposes nothing for it, so what it has heard of changes
nothing.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch


class OrderedOptunaSearch(OptunaSearch):
    """``OptunaSearch`` whose proposals do not depend on which trial ends first (see module doc).

    ``lag``: how many of the latest trials a proposal does not see (at least the number of workers).
    Call ``flush()`` after the search so the study holds every result (``run_search`` does).
    """

    def __init__(self, *args: Any, lag: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lag = max(1, lag)
        self._order: list[str] = []                    # trial ids in proposal order
        self._ended: dict[str, tuple[dict | None, bool]] = {}  # trial id -> (result, error), not yet told
        self._told = 0                                 # trials told, a prefix of _order

    def _tell_up_to(self, count: int) -> bool:
        """Tell trials [told, count) in order; False when one of them has not ended yet."""
        while self._told < count:
            trial_id = self._order[self._told]
            if trial_id not in self._ended:
                return False
            result, error = self._ended.pop(trial_id)
            super().on_trial_complete(trial_id, result, error)
            self._told += 1
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials:
            told = self._tell_up_to(max(0, len(self._order) - self.lag))
            if not told and not self._next_is_fixed():
                return None  # Ray Tune asks again later
            self._order.append(trial_id)
        return super().suggest(trial_id)

    def _next_is_fixed(self) -> bool:
        """Whether the study's next trial is an enqueued plan that fixes every value the space asks
        for (checked by running the space on an Optuna ``FixedTrial`` of it, which refuses a
        value it lacks)."""
        import optuna

        waiting = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if not waiting or not callable(self._space):
            return False
        fixed = min(waiting, key=lambda t: t.number).system_attrs.get("fixed_params", {})
        try:
            self._space(optuna.trial.FixedTrial(fixed))
        except Exception:  # noqa: BLE001 - a value missing or out of range: the sampler would propose it
            return False
        return True

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        self._ended[trial_id] = (result, error)
        self._tell_up_to(max(0, len(self._order) - self.lag))

    def flush(self) -> None:
        """Tell every ended trial, in order (after the search, so the stored study is complete)."""
        ended = [t for t in self._order[self._told:] if t in self._ended]
        for trial_id in ended:
            result, error = self._ended.pop(trial_id)
            super().on_trial_complete(trial_id, result, error)
