"""Task kind ``classifier``: a fine-tuned sequence classifier scored by its own head.

The exported graph takes token ids and returns the model's logits, so the file that is measured is
the file that ships. The data's labels are mapped to the model's ``id2label``: by name, or by class
id written as a number (``0``, ``1``, ...); a label the model does not know is an error that names it.
"""

from __future__ import annotations

import numpy as np

from slimtune.config import TaskConfig
from slimtune.model import LoadedModel, ModelLoadError, OutputSpec
from slimtune.tasks.base import Metric, PreparedTask, Progress, classification_metrics, encode_split
from slimtune.tasks.data import DataError, TextData, require_labels, task_split


def model_labels(config) -> tuple[str, ...]:
    """The model's label names in class-id order (from ``id2label``)."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return tuple(id2label[i] for i in sorted(id2label))


def map_labels(labels: tuple[str, ...], names: tuple[str, ...], origin: str) -> np.ndarray:
    """Class ids of ``labels``: a label is a name in ``names`` or a class id written as a number."""
    lookup = {**{str(i): i for i in range(len(names))}, **{name: i for i, name in enumerate(names)}}
    unknown = sorted({lbl for lbl in labels if lbl not in lookup})
    if unknown:
        raise DataError(f"{origin} has labels the model does not know: {unknown[:5]}"
                        f"{' and more' if len(unknown) > 5 else ''}; the model's labels (id2label) are "
                        f"{list(names)[:10]}: relabel the data or set task.label_column")
    return np.array([lookup[lbl] for lbl in labels])


def single_label_classes(config) -> tuple[str, ...]:
    """The label names of a single-label classifier; an error for regression and multi-label heads,
    whose outputs are not read by an argmax."""
    names = model_labels(config)
    problem = getattr(config, "problem_type", None)
    if len(names) < 2 or problem in ("regression", "multi_label_classification"):
        raise ModelLoadError(f"the model's head is not a single-label classifier ({len(names)} labels, problem_type "
                             f"{problem}): task kind classifier scores argmax predictions; use task.kind "
                             "embedding-fidelity to score its embeddings instead")
    return names


def prepare(loaded: LoadedModel, output: OutputSpec, max_length: int, cfg: TaskConfig, data: TextData,
            metric: str, reason: str, progress: Progress | None = None) -> PreparedTask:
    labels = require_labels(data, cfg, "classifier")
    names = single_label_classes(loaded.module.config)
    label_ids = map_labels(labels, names, data.origin)
    train, test = task_split(cfg, len(labels), labels)
    encoded = encode_split(loaded, output, data.texts, train, test, max_length, progress)
    return encoded.prepared("classifier", metric, reason, cfg.seed, score, labels=label_ids[test], label_names=names)


def score(task: PreparedTask, outputs: np.ndarray) -> tuple[Metric, ...]:
    """Accuracy and macro-F1 of the artifact's own head (argmax of its logits) on the held-out texts."""
    return classification_metrics(np.argmax(outputs, axis=1), task.labels, "the model's own head")
