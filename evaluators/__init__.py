"""Evaluators: an exported artifact in, named metrics with units out.

Every figure is measured on the file that would ship: accuracy by running it in ONNX Runtime,
size as its bytes on disk, latency as timed ONNX Runtime runs. New evaluators (perplexity, GPU
latency, ...) return the same ``Metric`` values, so search and tracking need no change.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One measured figure. ``name`` carries the unit suffix used in tables and CSV (e.g. latency_ms)."""

    name: str
    value: float
    unit: str
    description: str = ""


def as_dict(metrics: tuple[Metric, ...] | list[Metric]) -> dict[str, float]:
    return {m.name: m.value for m in metrics}
