"""What a search optimises, as plain values: importing it loads neither torch nor Ray.

``Objectives``: (metric name, "max" or "min") pairs, the task's metric first, then latency (ms)
and size (MB), both minimised.
"""

from __future__ import annotations

from slimtune.config import METRIC_GOALS

Objectives = tuple[tuple[str, str], ...]  # (metric name, "max" or "min"), the task's metric first


def objectives(metric: str) -> Objectives:
    """What a search optimises: the task's metric (towards its goal), latency and size (both down)."""
    return ((metric, METRIC_GOALS[metric]), ("latency_ms", "min"), ("size_mb", "min"))
