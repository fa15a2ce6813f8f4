"""Accuracy of the exported file, run in ONNX Runtime on the held-out split through the frozen head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from slimtune.evaluators import Metric
from slimtune.task import PreparedTask


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed(sess: ort.InferenceSession, input_ids: np.ndarray, attention_mask: np.ndarray,
          batch_size: int = 16) -> np.ndarray:
    outputs = []
    for start in range(0, len(input_ids), batch_size):
        batch = slice(start, start + batch_size)
        outputs.append(sess.run(None, {"input_ids": input_ids[batch], "attention_mask": attention_mask[batch]})[0])
    return np.concatenate(outputs)


def measure_accuracy(path: Path, task: PreparedTask, threads: int = 1) -> tuple[Metric, ...]:
    embeddings = embed(session(path, threads), task.input_ids, task.attention_mask)
    if not np.all(np.isfinite(embeddings)):
        raise FloatingPointError("the artifact produced non-finite embeddings")
    return (
        Metric("accuracy", task.accuracy(embeddings), "fraction",
               f"held-out accuracy of the frozen head on {len(task.labels)} texts"),
    )
