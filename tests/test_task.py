from __future__ import annotations

import json

import numpy as np
import pytest

from slimtune.config import ModelConfig, TaskConfig
from slimtune.model import load_encoder
from slimtune.task import DataError, PreparedTask, load_labelled_texts, prepare_task, split_indices


def test_builtin_bbc_news_has_all_articles():
    data = load_labelled_texts(TaskConfig())
    assert len(data.texts) == 2225
    assert sorted(set(data.labels)) == ["business", "entertainment", "politics", "sports", "tech"]


def test_jsonl_with_configured_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"t": f"text {i}", "y": i % 2}) for i in range(10)))
    data = load_labelled_texts(TaskConfig(data=str(path), text_column="t", label_column="y"))
    assert data.texts[3] == "text 3" and set(data.labels) == {"0", "1"}


@pytest.mark.parametrize(
    ("content", "suffix", "fragment"),
    [("a,b\n1,2\n", ".csv", "no column 'text'"), ("text,label\nx,1\ny,1\n", ".csv", "two distinct"),
     ('{"text": 1\n', ".jsonl", "not valid JSON"), ("x", ".txt", ".csv or .jsonl")],
)
def test_bad_data_files(tmp_path, content, suffix, fragment):
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=fragment):
        load_labelled_texts(TaskConfig(data=str(path)))


def test_split_is_seeded_and_stratified():
    labels = tuple("ab"[i % 2] for i in range(100))
    train, test = split_indices(labels, 0.2, 0)
    again_train, again_test = split_indices(labels, 0.2, 0)
    assert np.array_equal(test, again_test) and len(test) == 20 and not set(train) & set(test)
    assert sum(labels[i] == "a" for i in test) == 10


def test_head_is_fitted_once_and_cached(tiny_model_dir, tiny_csv, tmp_path):
    loaded = load_encoder(str(tiny_model_dir))
    cfg = TaskConfig(data=str(tiny_csv), text_column="body", label_column="topic")
    task, path = prepare_task(ModelConfig(name=str(tiny_model_dir), max_length=32), cfg, loaded, tmp_path)
    assert path.is_file() and task.input_ids.shape == (12, 32) and task.head_weight.shape == (3, 64)
    mtime = path.stat().st_mtime_ns
    again, again_path = prepare_task(ModelConfig(name=str(tiny_model_dir), max_length=32), cfg, loaded, tmp_path)
    assert again_path == path and path.stat().st_mtime_ns == mtime
    assert np.array_equal(again.head_weight, task.head_weight)
    assert PreparedTask.load(path).label_names == ("money", "sport", "tech")
