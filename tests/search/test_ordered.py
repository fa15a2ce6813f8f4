"""Proposals in trial order: a sampled plan waits until the trials it must know of have ended; an
enqueued plan that fixes every value is proposed at once."""

from __future__ import annotations

from slimtune.config import SpaceConfig
from slimtune.layout import discover_layout
from slimtune.search.ordered import OrderedOptunaSearch
from slimtune.search.runner import DefineByRun
from slimtune.search.samplers import make_sampler
from slimtune.spaces import SearchSpace


def test_enqueued_plans_do_not_wait_and_sampled_ones_do(bert):
    from slimtune.config import Config

    space = SearchSpace(discover_layout(bert), SpaceConfig(group_size=2))
    references = space.reference_points()
    partial = {k: v for k, v in list(references["uniform-int8"].items())[:2]}  # the sampler fills in the rest
    searcher = OrderedOptunaSearch(lag=1, space=DefineByRun(space), metric=["accuracy", "latency_ms", "size_mb"],
                                   mode=["max", "min", "min"], sampler=make_sampler(Config()),
                                   points_to_evaluate=[references["fp32"], references["uniform-int8"],
                                                       references["uniform-int8-ffn25"], partial])
    assert searcher.suggest("a") == references["fp32"]
    assert searcher.suggest("b") == references["uniform-int8"]  # lag 1: knows nothing yet either way
    # would know "a", still running; fixed in every value, so proposed at once
    assert searcher.suggest("c") == references["uniform-int8-ffn25"]
    assert searcher.suggest("d") is None  # only partly fixed: the sampler must have heard of "a" and "b"
    figures = {"accuracy": 0.9, "latency_ms": 10.0, "size_mb": 5.0}
    searcher.on_trial_complete("a", figures)
    assert searcher.suggest("d") is None  # "b" too
    searcher.on_trial_complete("b", figures)
    proposed = searcher.suggest("d")
    assert proposed is not None and all(proposed[k] == v for k, v in partial.items())


def test_a_trial_ends_for_the_proposals_when_it_reports_its_result(bert, caplog):
    """So Ray Tune stages the proposals it held back while that trial's actor still runs, and keeps
    the actor for one of them; the end Tune reports after is not told a second time."""
    import optuna

    from slimtune.config import Config

    space = SearchSpace(discover_layout(bert), SpaceConfig(group_size=2))
    searcher = OrderedOptunaSearch(lag=1, space=DefineByRun(space), metric=["accuracy", "latency_ms", "size_mb"],
                                   mode=["max", "min", "min"], sampler=make_sampler(Config()))
    assert searcher.suggest("a") is not None and searcher.suggest("b") is not None  # lag 1: "b" need not know "a"
    assert searcher.suggest("c") is None  # must have heard of "a"
    figures = {"accuracy": 0.9, "latency_ms": 10.0, "size_mb": 5.0}
    searcher.on_trial_result("a", figures)
    assert searcher.suggest("c") is not None  # "a" reported: its actor is still Tune's to keep
    searcher.on_trial_complete("a", figures)  # Tune's end of "a", after its result: nothing more to tell
    searcher.on_trial_complete("b", error=True)  # a trial with no result ends when Tune ends it
    trials = searcher._ot_study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                         optuna.trial.TrialState.RUNNING]
    assert trials[0].values == [0.9, 10.0, 5.0]
    assert not [r for r in caplog.records if "already finished" in r.getMessage()]  # told once, quietly
