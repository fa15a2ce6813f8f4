"""Shared fixtures: tiny random transformers built from a config, and tiny labelled data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertConfig, BertModel

from slimtune.config import BUILTIN_MODEL
from slimtune.model import resolve_model_source


def tiny_bert(vocab_size: int = 1000, seed: int = 0, layers: int = 2) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64)
    return BertModel(config).eval()


@pytest.fixture
def bert() -> BertModel:
    return tiny_bert()


@pytest.fixture
def token_batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 1000, size=(4, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 20:] = 0
    return ids, mask


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-block BERT with MiniLM's real tokenizer, saved as a normal Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(BUILTIN_MODEL))
    tiny_bert(vocab_size=tokenizer.vocab_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    """60 short labelled texts in three topics."""
    topics = {
        "sport": "the team won the match and the striker scored a late goal in the final",
        "money": "the bank raised interest rates and shares fell on the stock market today",
        "tech": "the new phone has a faster chip and the software update fixes the battery",
    }
    path = tmp_path_factory.mktemp("data") / "texts.csv"
    rng = np.random.default_rng(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["body", "topic"])
        for i in range(60):
            topic = list(topics)[i % 3]
            words = topics[topic].split()
            writer.writerow([" ".join(rng.permutation(words)[: 8 + i % 5]), topic])
    return path


@pytest.fixture(scope="session")
def search_config(tiny_model_dir, tiny_csv):
    """Writes a search config over the tiny model and data that measures latency quickly."""
    return lambda folder, trials: _write_search_config(folder, tiny_model_dir, tiny_csv, trials)


def _write_search_config(folder: Path, model_dir: Path, data: Path, trials: int) -> Path:
    config = {
        "model": {"name": str(model_dir), "max_length": 32},
        "task": {"data": str(data), "text_column": "body", "label_column": "topic"},
        "space": {"group_size": 1, "rank_fractions": [1.0, 0.5]},
        "latency": {"batch_size": 2, "sequence_length": 32, "threads": 1, "warmup_runs": 1, "timed_runs": 5},
        "search": {"trials": trials, "workers": 2, "seed": 3},
    }
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
