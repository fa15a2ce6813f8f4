from __future__ import annotations

import optuna
import pytest
from optuna.trial import FixedTrial

from slimtune.config import SpaceConfig
from slimtune.layout import discover_layout
from slimtune.plan import QuantSpec
from slimtune.spaces import SearchSpace


def _space(bert, **kw) -> SearchSpace:
    return SearchSpace(discover_layout(bert), SpaceConfig(**{"group_size": 1, **kw}))


def test_fixed_trial_becomes_a_per_module_plan(bert):
    space = _space(bert, rank_fractions=(1.0, 0.5, 0.25))
    params = {dim: options[0] for dim, options in space.dimensions().items() if len(options) > 1}
    params.update({"encoder.layer.1.ffn.bits": 4, "encoder.layer.1.ffn.sparsity": 0.5,
                   "encoder.layer.1.ffn.rank": 0.5, "embeddings.bits": 8, "encoder.layer.0.attention.bits": 8})
    plan = space.suggest(FixedTrial(params))
    assert plan.quantize["encoder.layer.1.intermediate.dense"].format == "int4"
    assert plan.quantize["encoder.layer.1.output.dense"].format == "int4"
    assert plan.quantize["encoder.layer.0.attention.self.query"].format == "int8"
    assert plan.quantize["embeddings.word_embeddings"].format == "int8"
    assert "encoder.layer.0.intermediate.dense" not in plan.quantize
    assert dict(plan.ffn_prune) == {"encoder.layer.1": 0.5}
    assert plan.low_rank["encoder.layer.1.output.dense"] == 0.5


def test_groups_tie_blocks(bert):
    space = _space(bert, group_size=2)
    assert [g.label for g in space.groups] == ["encoder.layer.0-1"]
    params = {"encoder.layer.0-1.ffn.sparsity": 0.25}
    plan = space.suggest(FixedTrial({**{d: o[0] for d, o in space.dimensions().items() if len(o) > 1}, **params}))
    assert dict(plan.ffn_prune) == {"encoder.layer.0": 0.25, "encoder.layer.1": 0.25}


def test_single_choices_are_fixed_and_useless_ranks_not_offered(bert):
    space = _space(bert, weight_formats=("int8",), ffn_sparsities=(0.0,), rank_fractions=(1.0, 0.5),
                   embedding_formats=("fp32",), low_rank_methods=("svd",))
    dims = space.dimensions()
    # 0.5 of a square 64x64 attention matrix saves nothing, so attention rank is not a choice.
    assert dims["encoder.layer.0.attention.rank"] == (1.0,)
    assert [d for d, o in dims.items() if len(o) > 1] == ["encoder.layer.0.ffn.rank", "encoder.layer.1.ffn.rank"]
    plan = space.suggest(FixedTrial({"encoder.layer.0.ffn.rank": 1.0, "encoder.layer.1.ffn.rank": 0.5}))
    assert all(spec.format == "int8" for spec in plan.quantize.values())


def test_reference_points_only_where_expressible(bert):
    assert list(_space(bert).reference_points()) == ["fp32", "uniform-int8", "uniform-int8-ffn25", "uniform-int8-ffn50"]
    assert set(_space(bert, weight_formats=("int8", "int4"), ffn_sparsities=(0.0,)).reference_points()) == {
        "uniform-int8"}
    pruned = _space(bert).suggest(FixedTrial(_space(bert).reference_points()["uniform-int8-ffn50"]))
    assert set(pruned.ffn_prune.values()) == {0.5} and {q.format for q in pruned.quantize.values()} == {"int8"}
    reference = _space(bert).reference_points()["fp32"]
    assert _space(bert).suggest(FixedTrial(reference)).is_identity


@pytest.mark.parametrize("sampler", [optuna.samplers.NSGAIISampler(seed=1), optuna.samplers.TPESampler(seed=1)])
def test_real_samplers_produce_valid_plans(bert, sampler):
    space = _space(bert)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    plans = []
    for _ in range(6):
        trial = study.ask()
        plans.append(space.suggest(trial))
        study.tell(trial, [0.5, 1.0])
    assert len({p.digest for p in plans}) > 1
    assert all(0.0 <= s < 1 for p in plans for s in p.ffn_prune.values())


def test_other_lookup_tables_follow_the_token_table_as_int8_rows(bert):
    space = _space(bert, embedding_formats=("fp32", "int4"))
    assert space.layout.other_tables == ("embeddings.position_embeddings", "embeddings.token_type_embeddings")
    small = space.plan_from_choices({"embeddings.bits": 4, "embeddings.block": 128})
    assert small.quantize["embeddings.word_embeddings"] == QuantSpec("int4", 128)
    assert {small.quantize[t].format for t in space.layout.other_tables} == {"int8"}
    plain = space.plan_from_choices({"embeddings.bits": 32})
    assert not set(plain.quantize) & {"embeddings.word_embeddings", *space.layout.other_tables}


def test_depth_and_heads_are_offered_only_where_the_model_allows(bert):
    layout = discover_layout(bert)
    plain = SearchSpace(layout, SpaceConfig(group_size=1))
    assert "blocks.dropped" not in plain.dimensions()  # no block importance measured: no depth choice
    assert plain.dimensions()["encoder.layer.0.attention.heads"] == (0.0,)  # no prunable heads known
    informed = SearchSpace(layout, SpaceConfig(group_size=1), block_order=("encoder.layer.1", "encoder.layer.0"),
                           head_groups={"encoder.layer.0": 4, "encoder.layer.1": 4})
    dims = informed.dimensions()
    assert dims["blocks.dropped"] == (0, 1) and dims["encoder.layer.0.attention.heads"] == (0.0, 0.25, 0.5)
    plan = informed.plan_from_choices({"blocks.dropped": 1, "encoder.layer.0.attention.heads": 0.5})
    assert plan.depth_prune == ("encoder.layer.1",) and dict(plan.head_prune) == {"encoder.layer.0": 0.5}


def test_recovery_steps_in_the_choices_attach_the_recipe(bert):
    from slimtune.plan import RecoverySpec

    space = SearchSpace(discover_layout(bert), SpaceConfig(group_size=1), recovery=RecoverySpec(steps=50))
    pruned = {"encoder.layer.0.ffn.sparsity": 0.5}
    assert space.plan_from_choices(pruned).recovery is None
    assert space.plan_from_choices({**pruned, "recovery.steps": 80}).recovery == RecoverySpec(steps=80)
    every = SearchSpace(discover_layout(bert), SpaceConfig(group_size=1), recovery=RecoverySpec(steps=50),
                        recover_in_trials=True)
    assert every.dimensions()["recovery.steps"] == (50,)
    assert every.plan_from_choices(pruned).recovery == RecoverySpec(steps=50)  # sampled params lack fixed dims


def test_a_language_model_head_offers_its_own_formats():
    from tests.conftest import tiny_llama

    llama = tiny_llama(300)
    layout = discover_layout(llama)
    config = SpaceConfig(weight_formats=("fp32", "int4"), lm_head_formats=("fp32", "int8", "int4"),
                         int4_methods=("rtn", "grid"))
    space = SearchSpace(layout, config)
    dims = space.dimensions()
    assert dims["lm_head.bits"] == (32, 8, 4) and dims["int4.method"] == ("rtn", "grid")
    assert all(8 not in options for name, options in dims.items() if name.endswith((".attention.bits", ".ffn.bits")))
    choices = {name: options[0] for name, options in dims.items()} | {"lm_head.bits": 8, "int4.method": "grid"}
    assert space.plan_from_choices(choices).quantize[layout.output_head] == QuantSpec("int8")
    assert "uniform-int4" in space.reference_points()
    # unset, the head takes the weight formats
    assert SearchSpace(layout, SpaceConfig(weight_formats=("fp32", "int4"))).dimensions()["lm_head.bits"] == (32, 4)
