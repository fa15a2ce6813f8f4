"""What every task kind shares: the prepared task, named metrics, and running a model over texts.

A task kind turns texts into a ``PreparedTask`` once (split, tokens, the uncompressed model's
outputs) and later scores any artifact from its outputs on the held-out texts. The scorer never
sees ONNX Runtime or torch: it gets a ``Run`` (feeds -> output array), so the uncompressed torch
model (the reference figures) and every exported file are scored by the same code.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtune.files import write_with
from slimtune.model import LoadedModel, OutputSpec, wrap_output
from slimtune.tasks.data import tokenize

Run = Callable[[dict[str, np.ndarray]], np.ndarray]
Progress = Callable[[int, int], None]
CALIBRATION_TEXTS = 64


@dataclass(frozen=True)
class Metric:
    """One measured figure. ``name`` carries the unit suffix used in tables and CSV (e.g. latency_ms)."""

    name: str
    value: float
    unit: str
    description: str = ""


@dataclass(frozen=True)
class PreparedTask:
    """Everything a trial needs to score a candidate, as plain arrays (int64 tokens, float32 outputs).

    ``kind`` and ``metric`` (the figure the search optimises, ``metric_reason`` says why that one);
    ``output``: what the artifact returns. Held-out texts: ``input_ids`` / ``attention_mask``.
    Training texts (never scored): ``train_ids`` / ``train_mask`` and ``train_targets``, the
    uncompressed model's outputs for them (distillation recovery's targets); ``calibration_*`` a
    few of them for activation statistics. ``reference``: the uncompressed torch model's figures.
    Kind-specific: ``labels`` (class ids of the held-out texts) and ``label_names``;
    ``head_weight`` (classes, hidden) / ``head_bias`` of the embedding head; ``reference_outputs``
    (the uncompressed embeddings of the held-out texts) for fidelity. ``uncompressed_outputs``: the
    uncompressed model's outputs for the held-out texts as the kind scores them (a causal LM's
    reduced per-position figures), which ``reference`` is the score of; None in tasks saved without them.
    """

    kind: str
    metric: str
    metric_reason: str
    output: OutputSpec
    input_ids: np.ndarray
    attention_mask: np.ndarray
    calibration_ids: np.ndarray
    calibration_mask: np.ndarray
    train_ids: np.ndarray
    train_mask: np.ndarray
    train_targets: np.ndarray | None  # None: none kept (a causal LM's logits are tens of MB per window)
    reference: dict[str, float] = dataclasses.field(default_factory=dict)
    labels: np.ndarray | None = None
    label_names: tuple[str, ...] = ()
    head_weight: np.ndarray | None = None
    head_bias: np.ndarray | None = None
    reference_outputs: np.ndarray | None = None
    uncompressed_outputs: np.ndarray | None = None

    @property
    def train_size(self) -> int:
        return len(self.train_ids)

    def held_out_rows(self, rows: np.ndarray) -> PreparedTask:
        """The same task scored on the held-out texts at ``rows`` only; ``reference`` is left empty
        (it was the full set's)."""
        per_text = {name: getattr(self, name)[rows] for name in ("input_ids", "attention_mask", "labels",
                                                                 "reference_outputs", "uncompressed_outputs")
                    if getattr(self, name) is not None}
        return dataclasses.replace(self, reference={}, **per_text)

    def sample_rows(self, count: int, seed: int = 0) -> np.ndarray:
        """A seeded random ``count`` of the held-out rows (all when there are no more), in order."""
        return np.sort(np.random.default_rng(seed).permutation(len(self.input_ids))[:count])

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, OutputSpec):
                value = json.dumps(dataclasses.asdict(value))
            elif isinstance(value, dict):
                value = json.dumps(value)
            arrays[f.name] = np.array(value) if not isinstance(value, np.ndarray) else value
        write_with(path, lambda tmp: np.savez(tmp, **arrays))

    @classmethod
    def load(cls, path: Path) -> PreparedTask:
        with np.load(path) as data:
            values = {name: data[name] for name in data.files}
        values["output"] = OutputSpec(**json.loads(str(values["output"])))
        values["reference"] = json.loads(str(values["reference"]))
        values["label_names"] = tuple(str(x) for x in values.get("label_names", ()))
        values.setdefault("train_targets", None)  # saved only when kept
        for name in ("kind", "metric", "metric_reason"):
            values[name] = str(values[name])
        return cls(**values)


TOKENS_PER_RUN = 512
"""Tokens in one scoring run (texts x their length) when the caller does not say: a run's
activations then stay in the cores' caches. A MiniLM run of 16 texts of 128 tokens holds 12 MB in
its widest layer alone, and scored 13-17% (int8) and 7% (fp32) slower per text in ONNX Runtime
than runs of 4 texts (one thread, one or two scoring processes at once; torch: 7% slower at one
thread, the same at two), on a 2-core AMD EPYC with 1 MB of L2 per core and 32 MB of L3. A run
stays long enough that its fixed cost does not count: one text a run was 3-5% slower than four.
A CPU with smaller caches loses more with larger runs; one without AVX-512 was not measured."""


def texts_per_run(sequence_length: int) -> int:
    """How many texts of ``sequence_length`` tokens one scoring run takes (``TOKENS_PER_RUN``)."""
    return max(1, TOKENS_PER_RUN // max(1, sequence_length))


def run_batches(run: Run, input_ids: np.ndarray, attention_mask: np.ndarray, batch_size: int | None = None,
                progress: Progress | None = None) -> np.ndarray:
    """``run`` over the texts in batches of ``batch_size`` (default ``texts_per_run``), outputs
    stacked (float32); non-finite outputs raise."""
    batch_size = batch_size or texts_per_run(input_ids.shape[1] if input_ids.ndim > 1 else 1)
    outputs = []
    for start in range(0, len(input_ids), batch_size):
        rows = slice(start, start + batch_size)
        outputs.append(np.asarray(run({"input_ids": input_ids[rows], "attention_mask": attention_mask[rows]})))
        if progress:
            progress(min(start + batch_size, len(input_ids)), len(input_ids))
    stacked = np.concatenate(outputs).astype(np.float32)
    if not np.all(np.isfinite(stacked)):
        raise FloatingPointError("the model produced non-finite outputs")
    return stacked


def torch_run(wrapped: nn.Module) -> Run:
    """A ``Run`` of a torch output wrapper (``slimtune.model.wrap_output``), without gradients."""

    @torch.no_grad()
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return wrapped(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()

    return run


@dataclass(frozen=True)
class EncodedSplit:
    """Tokens of both parts of a split and the uncompressed model's ``output`` for them."""

    output: OutputSpec
    train_ids: np.ndarray
    train_mask: np.ndarray
    train_outputs: np.ndarray
    test_ids: np.ndarray
    test_mask: np.ndarray
    test_outputs: np.ndarray

    def prepared(self, kind: str, metric: str, reason: str, seed: int,
                 score: Callable[[PreparedTask, np.ndarray], tuple[Metric, ...]], **specific: Any) -> PreparedTask:
        """The kind's PreparedTask of these texts (``specific``: its own fields), with a seeded choice of
        at most ``CALIBRATION_TEXTS`` training texts for activation statistics, and the uncompressed
        model's figures (``reference``) scored by the kind's ``score``."""
        rows = np.sort(np.random.default_rng(seed).permutation(len(self.train_ids))[:CALIBRATION_TEXTS])
        task = PreparedTask(
            kind=kind, metric=metric, metric_reason=reason, output=self.output,
            input_ids=self.test_ids, attention_mask=self.test_mask,
            calibration_ids=self.train_ids[rows], calibration_mask=self.train_mask[rows],
            train_ids=self.train_ids, train_mask=self.train_mask, train_targets=self.train_outputs,
            uncompressed_outputs=self.test_outputs, **specific,
        )
        return dataclasses.replace(task, reference={m.name: m.value for m in score(task, self.test_outputs)})


def encode_split(loaded: LoadedModel, output: OutputSpec, texts: tuple[str, ...], train: np.ndarray,
                 test: np.ndarray, max_length: int, progress: Progress | None = None) -> EncodedSplit:
    """Tokenize both parts and run the uncompressed model over them once (training texts first)."""
    train_ids, train_mask = tokenize(loaded.tokenizer, [texts[i] for i in train], max_length)
    test_ids, test_mask = tokenize(loaded.tokenizer, [texts[i] for i in test], max_length)
    outputs = run_batches(torch_run(wrap_output(loaded.module, output).eval()), np.concatenate([train_ids, test_ids]),
                          np.concatenate([train_mask, test_mask]), batch_size=32, progress=progress)
    return EncodedSplit(output, train_ids, train_mask, outputs[: len(train)], test_ids, test_mask, outputs[len(train):])


def classification_metrics(predicted: np.ndarray, labels: np.ndarray, scorer: str) -> tuple[Metric, ...]:
    """Accuracy and macro-F1 (over the classes present in ``labels``) of predicted class ids."""
    from sklearn.metrics import f1_score

    classes = np.unique(labels)
    macro_f1 = f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)
    return (
        Metric("accuracy", float(np.mean(predicted == labels)), "fraction",
               f"held-out accuracy of {scorer} on {len(labels)} texts"),
        Metric("macro_f1", float(macro_f1), "fraction",
               f"held-out F1 averaged over {len(classes)} classes alike, {scorer}"),
    )
