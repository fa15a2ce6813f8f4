"""Latency of the exported file: one ONNX Runtime session, fixed threads, warm-up, timed runs.

Reports the median, the 90th percentile and the spread (p90 - p10, relative to the median) in
milliseconds per batch. The timed section runs under the machine-wide exclusive lock, so no other
trial's work shares the cores while it is measured.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from slimtune.config import LatencyConfig
from slimtune.evaluators import Metric
from slimtune.evaluators.node_lock import NodeLock
from slimtune.evaluators.quality import session


def latency_inputs(input_ids: np.ndarray, attention_mask: np.ndarray, cfg: LatencyConfig) -> dict[str, np.ndarray]:
    """A fixed batch of real texts, cut or repeated to batch_size x sequence_length tokens."""
    rows = np.resize(np.arange(len(input_ids)), cfg.batch_size)
    ids = np.zeros((cfg.batch_size, cfg.sequence_length), dtype=np.int64)
    mask = np.zeros_like(ids)
    width = min(cfg.sequence_length, input_ids.shape[1])
    ids[:, :width], mask[:, :width] = input_ids[rows, :width], attention_mask[rows, :width]
    mask[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


def time_runs_ms(path: Path, feeds: dict[str, np.ndarray], cfg: LatencyConfig) -> np.ndarray:
    sess = session(path, cfg.threads)
    for _ in range(cfg.warmup_runs):
        sess.run(None, feeds)
    times = np.empty(cfg.timed_runs)
    for i in range(cfg.timed_runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times[i] = (time.perf_counter() - start) * 1e3
    return times


def summarize_ms(times: np.ndarray) -> tuple[Metric, ...]:
    median = float(np.median(times))
    p10, p90 = (float(x) for x in np.percentile(times, [10, 90]))
    return (
        Metric("latency_ms", median, "ms", "median wall time of one batch"),
        Metric("latency_p90_ms", p90, "ms", "90th percentile wall time of one batch"),
        Metric("latency_spread", (p90 - p10) / median, "fraction", "(p90 - p10) / median"),
    )


def measure_latency(path: Path, feeds: dict[str, np.ndarray], cfg: LatencyConfig,
                    lock: NodeLock | None = None) -> tuple[Metric, ...]:
    """Time ``path`` on ``feeds``; under ``lock`` held exclusively when given (callers that hold it already pass None)."""
    with lock.exclusive() if lock is not None else contextlib.nullcontext():
        times = time_runs_ms(path, feeds, cfg)
    return summarize_ms(times)
