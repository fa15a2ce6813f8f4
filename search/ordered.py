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
(7 and 9 s of an idle slot, twice in a 30-trial search on a 2-core AMD EPYC, avx512_vnni). A
trial counts as ended when it reports its result (a trial reports once, its measured figures, as
its last act), not when Ray Tune ends it after: the results a waiting proposal needs arrive a step earlier, while
the trial's actor still runs, so Ray Tune stages the proposed trials before it decides whether to
keep that actor, and keeps it for one of them. Waiting until the end made a slot that had waited
for a long trial cost a new process and the model's load again: Tune, with no trial staged,
kept the waiting slot's idle actor and ended the long trial's (a 4.6 s gap and a 2.8 s load in
one of two 30-trial searches on a 2-core Intel Xeon, avx512_vnni amx_int8; how often it happens
depends on how unequal the trials are, not on the CPU's instructions). An enqueued plan that
fixes every value the space asks for (the reference points, the sensitivity seeds) is proposed
without waiting: the sampler proposes nothing for it, so what it has heard of changes nothing.
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

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """A trial's one result: it has ended for the proposals (module doc)."""
        if trial_id not in self._ot_trials or trial_id in self._completed_trials or trial_id in self._ended:
            return super().on_trial_result(trial_id, result)
        self._end(trial_id, result, False)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        if trial_id in self._completed_trials or trial_id in self._ended:
            return  # ended on its result: told, or waiting for its turn
        self._end(trial_id, result, error)  # no result: failed, or stopped before it measured

    def _end(self, trial_id: str, result: dict | None, error: bool) -> None:
        self._ended[trial_id] = (result, error)
        self._tell_up_to(max(0, len(self._order) - self.lag))

    def flush(self) -> None:
        """Tell every ended trial, in order (after the search, so the stored study is complete)."""
        ended = [t for t in self._order[self._told:] if t in self._ended]
        for trial_id in ended:
            result, error = self._ended.pop(trial_id)
            super().on_trial_complete(trial_id, result, error)
