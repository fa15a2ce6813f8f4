from __future__ import annotations

import json

import numpy as np
import pytest

from slimtune.config import TaskConfig
from slimtune.tasks.data import (
    DataError,
    choose_classification_metric,
    load_texts,
    require_labels,
    split_indices,
    task_split,
)


def test_builtin_bbc_news_has_all_articles():
    data = load_texts(TaskConfig())
    assert len(data.texts) == 2225
    assert sorted(set(data.labels)) == ["business", "entertainment", "politics", "sports", "tech"]


def test_jsonl_with_configured_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"t": f"text {i}", "y": i % 2}) for i in range(10)))
    data = load_texts(TaskConfig(data=str(path), text_column="t", label_column="y"))
    assert data.texts[3] == "text 3" and set(data.labels) == {"0", "1"}


def test_a_text_file_is_one_text_per_line_without_labels(tmp_path):
    path = tmp_path / "queries.txt"
    path.write_text("first text\n\n  second text  \nthird\n")
    data = load_texts(TaskConfig(data=str(path)))
    assert data.texts == ("first text", "second text", "third") and data.labels is None


def test_a_table_without_the_label_column_has_no_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,other\nhello,1\nworld,2\n")
    data = load_texts(TaskConfig(data=str(path)))
    assert data.labels is None
    with pytest.raises(DataError, match="no label column 'label'.*task.kind: embedding-fidelity"):
        require_labels(data, TaskConfig(data=str(path)), "classifier")


@pytest.mark.parametrize(
    ("content", "suffix", "fragment"),
    [("a,b\n1,2\n", ".csv", "no column 'text'"), ('{"text": 1\n', ".jsonl", "not valid JSON"),
     ("x", ".parquet", ".csv, .jsonl or .txt"), ("\n\n", ".txt", "holds no text")],
)
def test_bad_data_files(tmp_path, content, suffix, fragment):
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=fragment):
        load_texts(TaskConfig(data=str(path)))


def test_a_single_label_cannot_be_classified(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nx,1\ny,1\n")
    cfg = TaskConfig(data=str(path))
    with pytest.raises(DataError, match="two distinct"):
        require_labels(load_texts(cfg), cfg, "embedding-head")


def test_split_is_seeded_and_stratified():
    labels = tuple("ab"[i % 2] for i in range(100))
    train, test = split_indices(100, 0.2, 0, labels)
    again_train, again_test = split_indices(100, 0.2, 0, labels)
    assert np.array_equal(test, again_test) and len(test) == 20 and not set(train) & set(test)
    assert sum(labels[i] == "a" for i in test) == 10


def test_train_limit_keeps_a_seeded_stratified_share_of_the_training_texts():
    labels = tuple("aaab"[i % 4] for i in range(200))  # three a to one b
    full_train, full_test = task_split(TaskConfig(), 200, labels)
    train, test = task_split(TaskConfig(train_limit=40, eval_limit=20), 200, labels)
    assert len(train) == 40 and set(train) <= set(full_train) and list(train) == sorted(train)
    assert sum(labels[i] == "b" for i in train) == 10  # the classes keep their shares
    assert len(test) == 20 and set(test) <= set(full_test)
    assert np.array_equal(train, task_split(TaskConfig(train_limit=40, eval_limit=20), 200, labels)[0])
    assert np.array_equal(task_split(TaskConfig(train_limit=1000), 200, labels)[0], full_train)  # fewer: all kept
    assert len(task_split(TaskConfig(train_limit=15), 200)[0]) == 15  # no labels: a seeded choice
    with pytest.raises(DataError, match="train_limit"):
        task_split(TaskConfig(train_limit=10), 200, tuple("abcdefghijkl"[i % 12] for i in range(200)))


@pytest.mark.parametrize(("counts", "metric"), [((40, 40, 8), "macro_f1"), ((40, 40, 10), "accuracy"),
                                                ((100, 24), "macro_f1"), ((100, 25), "accuracy")])
def test_macro_f1_when_the_smallest_class_is_under_a_quarter_of_the_largest(counts, metric):
    labels = tuple(name for name, count in zip("abc", counts, strict=False) for _ in range(count))
    chosen, reason = choose_classification_metric(labels)
    assert chosen == metric
    assert f"has {min(counts)} texts" in reason and str(max(counts)) in reason


@pytest.mark.parametrize(
    ("content", "suffix", "fragment"),
    [("text,label\ncaf\xe9,a\n".encode("latin-1"), ".csv", "is not valid utf-8 text (byte 0xe9 at offset 14)"),
     (bytes(range(256)) * 4, ".csv", "holds binary data"),
     (b'{"text": "a", "label": "x"}\n{"text": "b"}\n', ".jsonl", "row 2 has no 'label' value"),
     (b'{"text": "a"}\n{"body": "b"}\n', ".jsonl", "row 2 has no 'text' value"),
     (b"text,label\na,x\nb\n", ".csv", "row 2 has no 'label' value"),
     (b"[1, 2]\n", ".jsonl", "no column 'text'")],
)
def test_undecodable_and_incomplete_files_are_one_line_errors(tmp_path, content, suffix, fragment):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as caught:
        load_texts(TaskConfig(data=str(path)))
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_a_declared_encoding_reads_the_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\ncaf\xe9,a\nna\xefve,b\n".encode("cp1252"))
    data = load_texts(TaskConfig(data=str(path), encoding="cp1252"))
    assert data.texts == ("café", "naïve")
    with pytest.raises(DataError, match="not a known text encoding"):
        load_texts(TaskConfig(data=str(path), encoding="klingon"))
