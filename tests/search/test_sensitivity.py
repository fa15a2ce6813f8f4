"""The sensitivity profile: each choice alone, scored once; narrowing, the greedy path and seeds."""

from __future__ import annotations

import pytest

from slimtune.config import Config
from slimtune.prepare import prepare
from slimtune.search.sensitivity import (
    ChoiceEffect,
    SensitivityProfile,
    cached_profile,
    compressing_options,
    fp32_choices,
    greedy_path,
    guide,
    measure_profile,
    seed_plans,
)
from slimtune.search.trial import make_space, task_calibration


@pytest.fixture(scope="module")
def prepared_space(tiny_config, tmp_path_factory):
    config = Config.model_validate(tiny_config(space={"group_size": 1}))
    prepared = prepare(config, tmp_path_factory.mktemp("results"))
    calibration = task_calibration(prepared.loaded.module, prepared.task)
    return prepared, make_space(prepared.config, prepared.loaded.module, calibration), calibration


def test_every_compressing_choice_is_scored_alone(prepared_space, tmp_path):
    prepared, space, calibration = prepared_space
    profile = measure_profile(prepared.loaded.module, space, prepared.task, calibration, texts=10)
    pairs = compressing_options(space)
    assert [(e.dimension, e.option) for e in profile.effects] == pairs
    assert {dim.rpartition(".")[2] for dim, _ in pairs} >= {"bits", "sparsity", "rank", "heads"}
    assert all(option != fp32_choices(space)[dim] for dim, option in pairs)
    assert profile.texts == 10 and profile.seconds > 0
    int8 = [e for e in profile.effects if e.dimension.endswith(".bits") and e.option == 8]
    assert int8 and all(e.cosine > 0.99 for e in int8)  # int8 rounding barely moves the outputs
    assert all(e.cosine < 1.0 for e in profile.effects if e.dimension.endswith(".rank"))

    calls = []
    first, cached = cached_profile(tmp_path, "k", lambda: calls.append(1) or profile)
    again, cached_again = cached_profile(tmp_path, "k", lambda: calls.append(1) or profile)
    assert (cached, cached_again, len(calls)) == (False, True, 1) and again == profile


def _profile(space, harm: dict[tuple[str, object], float]) -> SensitivityProfile:
    effects = tuple(ChoiceEffect(dim, option, 1.0 - harm.get((dim, option), 0.0), 1.0 - harm.get((dim, option), 0.0))
                    for dim, option in compressing_options(space))
    return SensitivityProfile("accuracy", 1.0, effects, 10, 1.0)


def test_ruinous_choices_are_not_offered_and_the_path_adds_the_least_harmful_first(prepared_space):
    _, space, _ = prepared_space
    dims = space.dimensions()
    sparsity = next(d for d in dims if d.endswith(".ffn.sparsity"))
    rank = next(d for d in dims if d.endswith(".ffn.rank"))
    profile = _profile(space, {(sparsity, 0.5): 0.4, (rank, 0.5): 0.05})
    guidance = guide(space, profile, quality_floor=0.9, seed_count=3)
    assert dict(guidance.excluded) == {sparsity: (0.5,)}
    assert 0.5 not in guidance.space.dimensions()[sparsity]
    assert len(guidance.seeds) <= 3 and guidance.seeds
    for params in guidance.seeds.values():  # built on uniform int8: the layers' formats are the sampler's to explore
        assert params.get(sparsity, 0.0) != 0.5
        assert all(value == 8 for dim, value in params.items() if dim.endswith((".attention.bits", ".ffn.bits")))
        guidance.space.plan_from_choices(params)  # every seed is a plan of the narrowed space

    path = greedy_path(profile, space, quality_floor=0.9)
    losses = [loss for _, loss in path]
    assert losses == sorted(losses) and losses[-1] == pytest.approx(0.05)  # the harmful rank comes last
    assert path[-1][0][rank] == 0.5 and all(choices.get(sparsity) != 0.5 for choices, _ in path)
    picks = seed_plans(path, 3)
    assert picks[-1] == path[-1][0] and len(picks) == 3


def test_a_search_starts_from_fp32_int8_then_the_seeds(prepared_space):
    from slimtune.search.runner import enqueued_points

    _, space, _ = prepared_space
    seeds = {"sensitivity-1": {"embeddings.bits": 8}}
    points = enqueued_points(space, seeds)
    references = space.reference_points()
    assert points[0] == references["fp32"] and points[1] == references["uniform-int8"]
    assert points[2] == seeds["sensitivity-1"] and len(points) == len(references) + 1
    assert all(params in points for params in references.values())  # no reference point is lost


def test_a_language_models_seeds_quantize_with_the_first_listed_method():
    """The uniform-int4 reference is round to nearest (the one-command compression); the seeds built
    on it take the method the user listed first."""
    from slimtune.config import SpaceConfig
    from slimtune.layout import discover_layout
    from slimtune.spaces import SearchSpace
    from tests.conftest import tiny_llama

    layout = discover_layout(tiny_llama(300))
    space = SearchSpace(layout, SpaceConfig(weight_formats=("fp32", "int4"), int4_methods=("grid", "rtn"),
                                            ffn_sparsities=(0.0, 0.25), rank_fractions=(1.0,)))
    dims = space.dimensions()
    sparsity = next(d for d in dims if d.endswith(".ffn.sparsity"))
    guidance = guide(space, _profile(space, {(sparsity, 0.25): 0.01}), quality_floor=0.9, seed_count=2)
    assert space.reference_points()["uniform-int4"]["int4.method"] == "rtn"
    assert guidance.seeds and all(p["int4.method"] == "grid" for p in guidance.seeds.values())
