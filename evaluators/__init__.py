"""Evaluators: an exported artifact in, named metrics with units out.

Every figure is measured on the file that would ship: quality by running it in ONNX Runtime and
scoring its outputs with the task kind (``slimtune.tasks``), size as its bytes on disk, latency
as timed ONNX Runtime runs. New evaluators (GPU latency, decode latency, ...) return the same
``Metric`` values, so search and tracking need no change.
"""

from __future__ import annotations

from slimtune.tasks.base import Metric


def as_dict(metrics: tuple[Metric, ...] | list[Metric]) -> dict[str, float]:
    return {m.name: m.value for m in metrics}


__all__ = ["Metric", "as_dict"]
