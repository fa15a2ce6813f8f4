"""Choosing one point of a finished search's front by a rule the user gives.

Rules: an explicit ``trial``; limits (``max_latency_ms``, ``max_size_mb``, ``min_score`` on the
search's metric, ``max_drop`` in points below the search's fp32); then, among the points that meet
them, the best in the metric, or (when a quality floor is given) the fastest or the smallest as
``prefer`` says; or the ``knee`` of the front. Points are the rows of ``pareto.csv``.

For a metric that is minimised (perplexity), the limits turn round: ``min_score`` is the highest
value allowed and ``max_drop`` the percent above fp32's figure allowed (perplexity within +5%:
``max_drop=5``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slimtune.config import METRIC_GOALS

Row = dict[str, str]


class ChoiceError(ValueError):
    """No point meets the rule; the message says which limit failed, by how much, and the closest points."""


@dataclass(frozen=True)
class Rule:
    trial: str | None = None
    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    min_score: float | None = None
    max_drop: float | None = None  # points (x 100 of a fraction) below fp32's figure
    prefer: Literal["best", "fastest", "smallest"] | None = None
    knee: bool = False

    def describe(self, metric: str) -> str:
        if self.trial:
            return f"trial {self.trial}"
        if self.knee:
            return f"the knee of the front ({metric} against latency)"
        limits = self.limits(metric)
        return f"the {self.preference} point" + (f" with {', '.join(limits)}" if limits else "")

    def limits(self, metric: str) -> list[str]:
        limits = []
        if self.max_latency_ms is not None:
            limits.append(f"latency <= {self.max_latency_ms:g} ms")
        if self.max_size_mb is not None:
            limits.append(f"size <= {self.max_size_mb:g} MB")
        minimised = _minimised(metric)
        if self.min_score is not None:
            limits.append(f"{metric} {'<=' if minimised else '>='} {self.min_score:g}")
        if self.max_drop is not None:
            limits.append(f"{metric} at most {self.max_drop:g}% above fp32" if minimised
                          else f"{metric} at most {self.max_drop:g} points below fp32")
        return limits

    @property
    def preference(self) -> str:
        if self.prefer:
            return self.prefer
        return "fastest" if self.min_score is not None or self.max_drop is not None else "best"


def _f(row: Row, key: str) -> float:
    return float(row[key])


def _minimised(metric: str) -> bool:
    return METRIC_GOALS.get(metric) == "min"


def _quality(row: Row, metric: str) -> float:
    """The metric with higher meaning better (a minimised metric negated)."""
    return -_f(row, metric) if _minimised(metric) else _f(row, metric)


def _shortfalls(row: Row, rule: Rule, metric: str, fp32_score: float | None) -> dict[str, float]:
    """How far ``row`` is from each limit it misses, in the limit's unit."""
    missed = {}
    if rule.max_latency_ms is not None and _f(row, "latency_ms") > rule.max_latency_ms:
        missed["latency_ms"] = _f(row, "latency_ms") - rule.max_latency_ms
    if rule.max_size_mb is not None and _f(row, "size_mb") > rule.max_size_mb:
        missed["size_mb"] = _f(row, "size_mb") - rule.max_size_mb
    if _minimised(metric):
        ceiling = rule.min_score
        if rule.max_drop is not None and fp32_score is not None:
            ceiling = min(ceiling if ceiling is not None else 1e300, fp32_score * (1 + rule.max_drop / 100))
        if ceiling is not None and _f(row, metric) > ceiling:
            missed[metric] = _f(row, metric) - ceiling
        return missed
    floor = rule.min_score
    if rule.max_drop is not None and fp32_score is not None:
        floor = max(floor if floor is not None else -1e9, fp32_score - rule.max_drop / 100)
    if floor is not None and _f(row, metric) < floor:
        missed[metric] = floor - _f(row, metric)
    return missed


def knee(rows: list[Row], metric: str) -> Row:
    """The point farthest from the straight line between the best-scoring and the fastest point,
    in the front's (latency, metric) ranges normalised to [0, 1]: where giving up more quality
    stops buying much speed."""
    lat = [_f(r, "latency_ms") for r in rows]
    score = [_quality(r, metric) for r in rows]
    span_l, span_s = (max(lat) - min(lat)) or 1.0, (max(score) - min(score)) or 1.0
    points = [((x - min(lat)) / span_l, (y - min(score)) / span_s) for x, y in zip(lat, score, strict=True)]
    best, fastest = points[score.index(max(score))], points[lat.index(min(lat))]
    dx, dy = fastest[0] - best[0], fastest[1] - best[1]
    norm = (dx * dx + dy * dy) ** 0.5 or 1.0
    distance = [abs(dy * (x - best[0]) - dx * (y - best[1])) / norm for x, y in points]
    return rows[distance.index(max(distance))]


def choose(rows: list[Row], rule: Rule, metric: str, fp32_score: float | None) -> Row:
    """The front row the rule picks, or a ChoiceError naming the failed limits and the closest points."""
    if not rows:
        raise ChoiceError("the search's front is empty: nothing to export")
    if rule.trial:
        for row in rows:
            if row["trial"] == rule.trial:
                return row
        raise ChoiceError(f"{rule.trial} is not on the front; front points: {', '.join(r['trial'] for r in rows)}")
    if rule.knee:
        return knee(rows, metric)
    if rule.max_drop is not None and fp32_score is None:
        raise ChoiceError("--max-drop needs the search's fp32 reference, which did not complete: use --min-accuracy")
    meeting = [r for r in rows if not _shortfalls(r, rule, metric, fp32_score)]
    if meeting:
        key = {"best": lambda r: (-_quality(r, metric), _f(r, "latency_ms")),
               "fastest": lambda r: (_f(r, "latency_ms"), -_quality(r, metric)),
               "smallest": lambda r: (_f(r, "size_mb"), -_quality(r, metric))}[rule.preference]
        return min(meeting, key=key)
    scale = {"latency_ms": max(_f(r, "latency_ms") for r in rows), "size_mb": max(_f(r, "size_mb") for r in rows),
             metric: 1.0}
    closest = sorted(rows, key=lambda r: sum(v / scale[k] for k, v in _shortfalls(r, rule, metric, fp32_score).items()))
    lines = []
    for row in closest[:3]:
        missed = _shortfalls(row, rule, metric, fp32_score)
        lines.append(f"{row['trial']} misses " + ", ".join(f"{k} by {v:.4g}" for k, v in missed.items()))
    raise ChoiceError(f"no front point has {' and '.join(rule.limits(metric))}; closest: {'; '.join(lines)}")
