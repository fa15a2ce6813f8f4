"""Choosing a front point by rule: limits, preferences, the knee, and what a failed rule says."""

from __future__ import annotations

import pytest

from slimtune.release.choose import ChoiceError, Rule, choose, knee

FRONT = [
    {"trial": "trial-001", "accuracy": "0.97", "latency_ms": "60", "size_mb": "90"},
    {"trial": "trial-002", "accuracy": "0.965", "latency_ms": "25", "size_mb": "23"},
    {"trial": "trial-003", "accuracy": "0.95", "latency_ms": "15", "size_mb": "16"},
    {"trial": "trial-004", "accuracy": "0.80", "latency_ms": "12", "size_mb": "15"},
]


def _pick(rule: Rule, fp32: float | None = 0.97) -> str:
    return choose(FRONT, rule, "accuracy", fp32)["trial"]


def test_the_most_accurate_under_limits():
    assert _pick(Rule(max_latency_ms=30)) == "trial-002"
    assert _pick(Rule(max_latency_ms=30, max_size_mb=20)) == "trial-003"


def test_the_fastest_or_smallest_above_a_floor():
    assert _pick(Rule(min_score=0.96)) == "trial-002"
    assert _pick(Rule(max_drop=2.5)) == "trial-003"  # 0.97 - 0.025 = 0.945
    assert _pick(Rule(max_drop=20, prefer="smallest")) == "trial-004"


def test_an_explicit_trial_and_the_knee():
    assert _pick(Rule(trial="trial-004")) == "trial-004"
    assert knee(FRONT, "accuracy")["trial"] == "trial-003"
    with pytest.raises(ChoiceError, match="trial-009 is not on the front"):
        _pick(Rule(trial="trial-009"))


def test_a_rule_no_point_meets_names_the_limit_and_the_closest_points():
    with pytest.raises(ChoiceError, match=r"no front point has latency <= 10 ms; closest: trial-004 misses latency_ms by 2") as caught:
        _pick(Rule(max_latency_ms=10))
    assert caught.value.args[0].count("misses") == 3
    with pytest.raises(ChoiceError, match="needs the search's fp32"):
        _pick(Rule(max_drop=1), fp32=None)
