"""Quality of the exported file: its outputs on the held-out texts, in ONNX Runtime, scored by the task kind.

The artifact runs exactly as it would ship (one ONNX Runtime session, CPU); the task kind turns
its outputs into named metrics (accuracy and macro-F1, embedding cosine and top-10 overlap, or
perplexity and next-token agreement).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import onnxruntime as ort

from slimtune.evaluators import Metric
from slimtune.export.decoder import with_empty_past
from slimtune.tasks import KINDS, PreparedTask, score_task, scoring_run
from slimtune.tasks.base import run_batches


def session(path: Path | bytes, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of the file at ``path`` (or of a serialized graph in memory)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def session_run(sess: ort.InferenceSession):
    """The task kinds' ``Run``: feeds -> the graph's first output. A decoder with a KV cache runs
    whole sequences with an empty past and returns only its logits."""
    inputs = sess.get_inputs()
    first = [sess.get_outputs()[0].name]

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return sess.run(first, with_empty_past(inputs, feeds))[0]

    return run


def measure_quality(path: Path, task: PreparedTask, threads: int = 1) -> tuple[Metric, ...]:
    """Every metric of the task's kind for the artifact at ``path`` (``task.metric`` is the searched one)."""
    return score_task(task, session_run(session(path, threads)))


SAME_OUTPUTS = 1e-3
"""Largest difference, relative to the largest magnitude of its output channel (an embedding's
dimension, a class's logit, a causal LM's log-probability), between an artifact's output and the
uncompressed model's for them to count as one function: float32 kernels that sum in another order
differ by about 1e-6 of it, a quantized layer by far more (the default model's fp32 export against
torch: 1.6e-6; with every Linear in int8: 0.20; SmolLM2's fp32 decoder: 1.5e-6 of its
log-probabilities).
A causal LM's other channel, the top token, is held by the metrics: its agreement must stay 1."""
SAME_METRICS = 1e-4
"""Largest relative difference between the two's metrics on the sample: float noise stays below it,
one text scored differently (1/112 of the default's sample accuracy) is far above it."""


class StagedQuality:
    """Scores an artifact on a sample of the held-out texts first and on the rest only when asked,
    in one ONNX Runtime session: candidates a measured point already dominates stop after the sample.

    ``first``: the sampled rows (``PreparedTask.sample_rows``); all rows means no second stage.
    """

    def __init__(self, path: Path | bytes, task: PreparedTask, threads: int, first: np.ndarray,
                 hold: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """``hold``: entered around each batch (a shared node lock: a waiting latency measurement
        gets the cores after one batch, not after the whole scoring)."""
        self.task, self.first = task, np.asarray(first)
        self.rest = np.setdiff1d(np.arange(len(task.input_ids)), self.first)
        with hold():  # opening a session is heavy work too
            run = scoring_run(task.kind, session_run(session(path, threads)))

        def held_run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            with hold():
                return run(feeds)

        self.run = held_run
        self._first_outputs: np.ndarray | None = None

    def first_stage(self, uncompressed_check: int = 0) -> tuple[Metric, ...]:
        """Every metric of the task's kind on the sampled texts.

        ``uncompressed_check`` (texts, for an export of the uncompressed model): score that many of
        the sampled texts first; when the artifact computes there what the uncompressed model
        computed (``uncompressed_figures``' test), the sample's outputs are that model's kept ones
        and the rest of the sample is not run; otherwise it is. Scoring the fp32 export is a
        search's slowest (the default model on one thread: 30 ms a text against 11 ms int8 on a
        2-core AMD EPYC with AVX-512 VNNI), and an export that computes another function is not
        expected to agree on a few texts and differ on the rest: the default's all-int8 export is
        0.20 of a channel's magnitude away on the sample, its fp32 export 1.6e-6."""
        ids, mask = self.task.input_ids, self.task.attention_mask
        check = self.first[:uncompressed_check]
        if self.task.uncompressed_outputs is not None and 0 < len(check) < len(self.first):
            outputs = run_batches(self.run, ids[check], mask[check])
            if self._same_function(check, outputs):
                self._first_outputs = self.task.uncompressed_outputs[self.first].astype(np.float32)
            else:
                rest = self.first[len(check):]
                self._first_outputs = np.concatenate([outputs, run_batches(self.run, ids[rest], mask[rest])])
        else:
            self._first_outputs = run_batches(self.run, ids[self.first], mask[self.first])
        return KINDS[self.task.kind].score(self.task.held_out_rows(self.first), self._first_outputs)

    def _same_function(self, rows: np.ndarray, got: np.ndarray) -> bool:
        """True when ``got``, this artifact's outputs on the held-out ``rows``, are within
        ``SAME_OUTPUTS`` of the uncompressed model's kept outputs and score the same metrics
        (``SAME_METRICS``, relative)."""
        kind, expected = KINDS[self.task.kind], self.task.uncompressed_outputs[rows]
        if got.shape != expected.shape:
            return False
        scale = np.max(np.abs(expected), axis=tuple(range(expected.ndim - 1)), keepdims=True)  # per output channel
        if np.any(np.abs(got - expected) > SAME_OUTPUTS * scale):
            return False
        part = self.task.held_out_rows(rows)
        return all(abs(mine.value - theirs.value) <= SAME_METRICS * max(abs(theirs.value), 1e-12)
                   for mine, theirs in zip(kind.score(part, got), kind.score(part, expected), strict=True))

    def uncompressed_figures(self) -> tuple[Metric, ...] | None:
        """The uncompressed model's metrics on every held-out text (the task's ``reference``, scored
        from its kept outputs) when this artifact computes the same function: on the sampled texts (or
        on those ``first_stage`` checked) its outputs are within ``SAME_OUTPUTS`` of the uncompressed
        model's and every metric is the same (``SAME_METRICS``, relative). None otherwise, or when
        the task kept no uncompressed outputs. For an export of the uncompressed model, whose scoring
        is the slowest of a search, this replaces scoring the rest of the texts."""
        reference = self.task.uncompressed_outputs
        if reference is None:
            return None
        if self._first_outputs is None:
            self.first_stage()
        if not self._same_function(self.first, self._first_outputs):
            return None
        return KINDS[self.task.kind].score(self.task, reference)

    def full(self) -> tuple[Metric, ...]:
        """Every metric on all held-out texts (the sample's outputs reused)."""
        if self._first_outputs is None:
            self.first_stage()
        outputs = np.empty((len(self.task.input_ids), *self._first_outputs.shape[1:]), np.float32)
        outputs[self.first] = self._first_outputs
        if len(self.rest):
            outputs[self.rest] = run_batches(self.run, self.task.input_ids[self.rest], self.task.attention_mask[self.rest])
        return KINDS[self.task.kind].score(self.task, outputs)
