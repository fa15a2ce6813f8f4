"""Size of the shipped artifact: bytes on disk, external data included (reported in MB = 1e6 bytes)."""

from __future__ import annotations

from pathlib import Path

from slimtune.evaluators import Metric
from slimtune.export.size import artifact_bytes


def measure_size(path: Path) -> tuple[Metric, ...]:
    size = artifact_bytes(path)
    return (Metric("size_mb", size / 1e6, "MB", "bytes on disk of the ONNX file and its external data / 1e6"),)
