"""Quality of the exported file: its outputs on the held-out texts, in ONNX Runtime, scored by the task kind.

The artifact runs exactly as it would ship (one ONNX Runtime session, CPU); the task kind turns
its outputs into named metrics (accuracy and macro-F1, or embedding cosine and top-10 overlap).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from slimtune.evaluators import Metric
from slimtune.tasks import PreparedTask, score_task


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def session_run(sess: ort.InferenceSession):
    """The task kinds' ``Run``: feeds -> the graph's (only) output."""

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return sess.run(None, feeds)[0]

    return run


def measure_quality(path: Path, task: PreparedTask, threads: int = 1) -> tuple[Metric, ...]:
    """Every metric of the task's kind for the artifact at ``path`` (``task.metric`` is the searched one)."""
    return score_task(task, session_run(session(path, threads)))
