from __future__ import annotations

import pytest

from slimtune.plan import CompressionPlan, PlanError, QuantSpec, factor_rank, pruned_width


def _plan() -> CompressionPlan:
    return CompressionPlan(
        quantize={"b.ffn.up": QuantSpec("int4", 64), "a.q": QuantSpec("int8"), "c": QuantSpec("fp32")},
        low_rank={"b.ffn.up": 0.5, "a.q": 1.0},
        ffn_prune={"b": 0.25, "a": 0.0},
    )


def test_json_round_trip_and_no_op_entries_dropped():
    plan = _plan()
    assert CompressionPlan.loads(plan.dumps()) == plan
    assert set(plan.quantize) == {"a.q", "b.ffn.up"}
    assert dict(plan.low_rank) == {"b.ffn.up": 0.5}
    assert dict(plan.ffn_prune) == {"b": 0.25}


def test_digest_is_content_based():
    assert _plan().digest == CompressionPlan.loads(_plan().dumps()).digest
    assert _plan().digest != CompressionPlan(ffn_prune={"b": 0.5}).digest
    assert CompressionPlan().is_identity and CompressionPlan(quantize={"x": QuantSpec("fp32")}).is_identity


def test_plan_is_frozen():
    plan = _plan()
    with pytest.raises(AttributeError):
        plan.low_rank = {}
    with pytest.raises(TypeError):
        plan.ffn_prune["b"] = 0.9


@pytest.mark.parametrize(
    "build",
    [
        lambda: QuantSpec("int3"),
        lambda: QuantSpec("int4", 48),
        lambda: CompressionPlan(low_rank={"x": 0.0}),
        lambda: CompressionPlan(ffn_prune={"x": 1.0}),
        lambda: CompressionPlan.from_json({"version": 99}),
        lambda: CompressionPlan.from_json({"version": 1, "prune_heads": {}}),
    ],
)
def test_invalid_plans_raise(build):
    with pytest.raises(PlanError):
        build()


def test_factor_rank_only_where_it_removes_parameters():
    assert factor_rank(384, 1536, 0.5) == 192
    assert factor_rank(384, 384, 0.5) is None  # 192 * 768 == 384 * 384: no saving
    assert factor_rank(384, 384, 0.25) == 96
    assert factor_rank(384, 384, 1.0) is None
    assert pruned_width(1536, 0.25) == 1152
    assert pruned_width(4, 0.99) == 1
