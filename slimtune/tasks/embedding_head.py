"""Task kind ``embedding-head``: a sentence-embedding model read by a frozen classification head.

A logistic-regression head is fitted once, on the *uncompressed* model's pooled embeddings of a
seeded, stratified training split, then frozen. Every candidate is scored by the same head on the
same held-out split, so differences come from the compression alone.
"""

from __future__ import annotations

import numpy as np

from slimtune.config import TaskConfig
from slimtune.model import LoadedModel, OutputSpec
from slimtune.tasks.base import Metric, PreparedTask, Progress, classification_metrics, encode_split
from slimtune.tasks.data import TextData, require_labels, task_split


def prepare(loaded: LoadedModel, output: OutputSpec, max_length: int, cfg: TaskConfig, data: TextData,
            metric: str, reason: str, progress: Progress | None = None) -> PreparedTask:
    from sklearn.linear_model import LogisticRegression

    labels = require_labels(data, cfg, "embedding-head")
    label_names = tuple(sorted(set(labels)))
    label_ids = np.array([label_names.index(lbl) for lbl in labels])
    train, test = task_split(cfg, len(labels), labels)
    encoded = encode_split(loaded, output, data.texts, train, test, max_length, progress)
    head = LogisticRegression(max_iter=2000, random_state=cfg.seed).fit(encoded.train_outputs, label_ids[train])
    weight, bias = head.coef_, head.intercept_
    if weight.shape[0] == 1:  # binary: sklearn keeps one score; two rows make argmax work for any class count
        weight, bias = np.vstack([-weight, weight]), np.concatenate([-bias, bias])
    return encoded.prepared("embedding-head", metric, reason, cfg.seed, score, labels=label_ids[test],
                            label_names=label_names, head_weight=weight.astype(np.float32),
                            head_bias=bias.astype(np.float32))


def score(task: PreparedTask, outputs: np.ndarray) -> tuple[Metric, ...]:
    """Accuracy and macro-F1 of the frozen head on the artifact's embeddings of the held-out texts."""
    predicted = np.argmax(outputs @ task.head_weight.T + task.head_bias, axis=1)
    return classification_metrics(predicted, task.labels, "the frozen head")
