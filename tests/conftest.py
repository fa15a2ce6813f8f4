"""Shared fixtures: tiny random transformers built from a config, and tiny generated data."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

from slimtune.config import BUILTIN_MODEL
from slimtune.model import resolve_model_source


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (for servers a test starts itself)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


TOPICS = {
    "sport": "the team won the match and the striker scored a late goal in the final",
    "money": "the bank raised interest rates and shares fell on the stock market today",
    "tech": "the new phone has a faster chip and the software update fixes the battery",
}


def topic_texts(counts: dict[str, int], seed: int = 0) -> list[tuple[str, str]]:
    """(text, topic) pairs: shuffled words of each topic's sentence, ``counts[topic]`` of each, interleaved."""
    rng = np.random.default_rng(seed)
    order = [topic for i in range(max(counts.values())) for topic in counts if i < counts[topic]]
    return [(" ".join(rng.permutation(TOPICS[t].split())[: 8 + i % 5]), t) for i, t in enumerate(order)]


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("body", "topic")) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    """60 short labelled texts in three balanced topics."""
    return write_csv(tmp_path_factory.mktemp("data") / "texts.csv", topic_texts({"sport": 20, "money": 20, "tech": 20}))


@pytest.fixture(scope="session")
def many_texts_csv(tmp_path_factory) -> Path:
    """240 short labelled texts in three balanced topics: enough held-out texts for staged scoring."""
    return write_csv(tmp_path_factory.mktemp("data") / "many.csv", topic_texts({"sport": 80, "money": 80, "tech": 80}))


@pytest.fixture(scope="session")
def imbalanced_csv(tmp_path_factory) -> Path:
    """88 texts: 40 sport, 40 money, 8 tech (the smallest class under a quarter of the largest)."""
    return write_csv(tmp_path_factory.mktemp("data") / "imbalanced.csv",
                     topic_texts({"sport": 40, "money": 40, "tech": 8}, seed=1))


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, imbalanced_csv) -> Path:
    """A 2-block BERT sequence classifier (random init, MiniLM's tokenizer) trained briefly on the
    imbalanced topics, saved as a normal Hugging Face folder with its id2label."""
    folder = tmp_path_factory.mktemp("tiny-classifier")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(BUILTIN_MODEL))
    names = ("money", "sport", "tech")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, num_labels=3,
                        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model = BertForSequenceClassification(config)
    rows = list(csv.DictReader(imbalanced_csv.open()))
    enc = tokenizer([r["body"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor([names.index(r["topic"]) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(100):
        batch = torch.randperm(len(rows), generator=generator)[:16]
        loss = model(input_ids=enc["input_ids"][batch], attention_mask=enc["attention_mask"][batch],
                     labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir, tiny_csv):
    """Builds a config dict over the tiny model and data that measures latency quickly; keyword
    sections are merged over it (``tiny_config(search={"trials": 4}, latency={"timed_runs": 20})``)."""

    def make(**sections: dict) -> dict:
        base = {
            "model": {"name": str(tiny_model_dir), "max_length": 32},
            "task": {"data": str(tiny_csv), "text_column": "body", "label_column": "topic"},
            "latency": {"batch_size": 2, "sequence_length": 32, "threads": 1, "warmup_runs": 1, "timed_runs": 5},
        }
        return {**base, **{name: {**base.get(name, {}), **values} for name, values in sections.items()}}

    return make


@pytest.fixture(scope="session")
def search_config(tiny_config):
    """Writes a search config over the tiny model and data that measures latency quickly."""

    def write(folder: Path, trials: int) -> Path:
        config = tiny_config(space={"group_size": 1, "rank_fractions": [1.0, 0.5]},
                             search={"trials": trials, "workers": 2, "seed": 3})
        path = folder / "search.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


@dataclass(frozen=True)
class FinishedSearch:
    """A finished search for tests to read: ``folder`` holds ``results/`` (``results/<name>/`` and
    ``mlflow.db``); ``stdout`` is what the search printed; ``trials`` sampled trials; recovery
    stopped by its time budget before ``recovery_steps``."""

    folder: Path
    stdout: str
    name: str = "night"
    trials: int = 6
    recovery_steps: int = 100_000

    @property
    def results(self) -> Path:
        return self.folder / "results"


@pytest.fixture(scope="session")
def _finished_search_once(tmp_path_factory, tiny_config) -> FinishedSearch:
    """One real search through the CLI in a fresh process (local Ray, Optuna, MLflow on SQLite) over
    the tiny model: 6 trials on 2 workers, per-block groups, low-rank open, recovery of 2 front
    points stopped by a 3 s budget (so recovered plans record the steps they did). Several test
    modules read what it leaves; each gets its own copy (``finished_search``), never this folder."""
    folder = tmp_path_factory.mktemp("shared-search")
    shape = FinishedSearch(folder, "")
    config = tiny_config(space={"group_size": 1, "rank_fractions": [1.0, 0.5]},
                         recovery={"steps": shape.recovery_steps, "budget_s": 3, "front_points": 2},
                         latency={"warmup_runs": 2, "timed_runs": 20},
                         search={"trials": shape.trials, "workers": 2, "seed": 3})
    (folder / "search.yaml").write_text(yaml.safe_dump(config))
    stale = shape.results / ".work" / shape.name / "measured" / "stale.json"  # a failed search's leftovers
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    done = subprocess.run([sys.executable, "-m", "slimtune", "search", "--config", "search.yaml", "--name",
                           shape.name, "--results-dir", "results"], capture_output=True, text=True, timeout=900,
                          cwd=folder, env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return FinishedSearch(folder, done.stdout)


@pytest.fixture(scope="module")
def finished_search(_finished_search_once, tmp_path_factory) -> FinishedSearch:
    """A copy of the shared finished search for one test module, which may change it (export into
    it, register models, edit its CSVs)."""
    folder = tmp_path_factory.mktemp("search-copy")
    shutil.copytree(_finished_search_once.folder, folder, dirs_exist_ok=True)
    return FinishedSearch(folder, _finished_search_once.stdout)


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path) -> CliResult:
    """The ``slimtune`` command line run in this process from ``cwd`` (Typer's runner: the same
    commands, options, exit codes and stderr, without a fresh interpreter's imports); the commands
    that must run as their own process are run with ``python -m slimtune`` by their tests."""
    from typer.testing import CliRunner

    from slimtune.cli import app

    with contextlib.chdir(cwd):
        result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="session")
def cli():
    """``run_cli``: the command line in this process (``cli("export", "night", ..., cwd=folder)``)."""
    return run_cli


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 3):
    """A random Llama-architecture causal LM: grouped-query attention (4 query heads on 2 key/value
    heads), a gated MLP, tied input and output embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 3-block random Llama with MiniLM's real tokenizer, saved as a normal Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(BUILTIN_MODEL))
    tiny_llama(tokenizer.vocab_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
