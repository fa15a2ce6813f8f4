"""Task kind ``embedding-fidelity``: no labels; how well the compressed model agrees with the original.

For people who ship an embedding model for search and have texts but no labels. Two figures on the
held-out texts, against the uncompressed model's embeddings of the same texts:

* ``embedding_cosine``: the mean cosine similarity between each text's two embeddings;
* ``top10_overlap``: retrieval agreement, the mean fraction of each text's 10 nearest neighbours
  (cosine, among the held-out texts, itself excluded) that the compressed model finds too.
"""

from __future__ import annotations

import numpy as np

from slimtune.config import TaskConfig
from slimtune.model import LoadedModel, OutputSpec
from slimtune.tasks.base import Metric, PreparedTask, Progress, encode_split
from slimtune.tasks.data import DataError, TextData, task_split

NEIGHBOURS = 10


def prepare(loaded: LoadedModel, output: OutputSpec, max_length: int, cfg: TaskConfig, data: TextData,
            metric: str, reason: str, progress: Progress | None = None) -> PreparedTask:
    train, test = task_split(cfg, len(data.texts))
    if len(test) <= NEIGHBOURS:
        raise DataError(f"{data.origin} leaves {len(test)} held-out texts; top-{NEIGHBOURS} neighbours need at least "
                        f"{NEIGHBOURS + 1}: give more texts or raise task.test_fraction")
    encoded = encode_split(loaded, output, data.texts, train, test, max_length, progress)
    return encoded.prepared("embedding-fidelity", metric, reason, cfg.seed, score,
                            reference_outputs=encoded.test_outputs)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(embeddings: np.ndarray, count: int) -> np.ndarray:
    """(texts, count) indices of each text's most cosine-similar other texts (unordered)."""
    unit = _unit_rows(embeddings)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argpartition(-similarity, count - 1, axis=1)[:, :count]


def neighbour_overlap(reference: np.ndarray, candidate: np.ndarray, count: int = NEIGHBOURS) -> float:
    """Mean fraction of each text's ``count`` nearest neighbours under ``reference`` kept under ``candidate``."""
    ours, theirs = nearest_neighbours(reference, count), nearest_neighbours(candidate, count)
    return float(np.mean([len(np.intersect1d(a, b)) / count for a, b in zip(ours, theirs, strict=True)]))


def score(task: PreparedTask, outputs: np.ndarray) -> tuple[Metric, ...]:
    reference = task.reference_outputs
    cosine = float(np.mean(np.sum(_unit_rows(outputs) * _unit_rows(reference), axis=1)))
    texts = len(reference)
    return (
        Metric("top10_overlap", neighbour_overlap(reference, outputs), "fraction",
               f"mean share of each text's {NEIGHBOURS} nearest neighbours (among {texts} held-out texts) "
               "that the uncompressed model also finds"),
        Metric("embedding_cosine", cosine, "cosine",
               f"mean cosine similarity to the uncompressed model's embedding, over {texts} held-out texts"),
    )
