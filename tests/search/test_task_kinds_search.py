"""Real small searches for the other task kinds: a fine-tuned classifier scored by its own head, and
label-free embedding fidelity. Local Ray, Optuna, MLflow on an SQLite file; tiny models."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

FAST_LATENCY = {"batch_size": 2, "sequence_length": 32, "threads": 1, "warmup_runs": 1, "timed_runs": 5}


def _search(folder: Path, config: dict, name: str) -> tuple[Path, str]:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    results = folder / "results"
    done = subprocess.run(
        [sys.executable, "-m", "slimtune", "search", "--config", str(path), "--name", name, "--results-dir",
         str(results)], capture_output=True, text=True, timeout=900, env={**os.environ, "RAY_ADDRESS": ""}, cwd=folder,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return results, done.stdout


def _runs(results: Path, name: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("slimtune").experiment_id], max_results=200)
    parent = next(r for r in runs if r.info.run_name == name and "mlflow.parentRunId" not in r.data.tags)
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


@pytest.fixture(scope="module")
def classifier_search(tmp_path_factory, tiny_classifier_dir, imbalanced_csv):
    folder = tmp_path_factory.mktemp("classifier")
    (folder / "my-classifier").symlink_to(tiny_classifier_dir)  # a relative folder: Ray workers run elsewhere
    config = {
        "model": {"name": "my-classifier", "max_length": 32},
        "task": {"data": str(imbalanced_csv), "text_column": "body", "label_column": "topic"},
        "space": {"group_size": 1, "rank_fractions": [1.0, 0.5]},
        "recovery": {"steps": 5},
        "latency": FAST_LATENCY,
        "search": {"trials": 5, "workers": 2, "seed": 1},
    }
    return _search(folder, config, "clf")


def test_a_classifier_search_maximises_macro_f1_on_imbalanced_labels(classifier_search):
    results, stdout = classifier_search
    assert "task: classifier" in stdout and "metric: macro_f1" in stdout and "imbalanced" in stdout
    rows = list(csv.DictReader((results / "clf" / "pareto.csv").open()))
    columns = list(rows[0])
    assert columns.index("macro_f1") < columns.index("accuracy") < columns.index("latency_ms")  # searched first
    scores = [float(r["macro_f1"]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # the front is read best-metric first
    resolved = yaml.safe_load((results / "clf" / "search_config.yaml").read_text())
    assert resolved["task"]["kind"] == "classifier" and resolved["task"]["metric"] == "macro_f1"
    model = next((results / "clf" / "models").iterdir())
    import onnx

    assert [o.name for o in onnx.load(str(model)).graph.output] == ["logits"]


def test_a_classifier_search_logs_both_metrics_to_mlflow(classifier_search):
    results, _ = classifier_search
    parent, children = _runs(results, "clf")
    assert parent.data.params["task_kind"] == "classifier" and parent.data.params["metric"] == "macro_f1"
    assert {"best_macro_f1", "reference_macro_f1", "reference_accuracy"} <= set(parent.data.metrics)
    done = [c for c in children if c.info.status == "FINISHED"]
    assert len(done) >= 5 and all({"accuracy", "macro_f1", "latency_ms", "size_mb"} <= set(c.data.metrics)
                                  for c in done)
    assert all("bert.encoder.layer.0.ffn.bits" in c.data.params for c in children)
    assert any(c.data.tags["slimtune.pareto"] == "true" for c in children)


def test_a_fidelity_search_needs_no_labels(tmp_path_factory, tiny_model_dir, tiny_csv):
    folder = tmp_path_factory.mktemp("fidelity")
    texts = folder / "texts.txt"
    texts.write_text("\n".join(r["body"] for r in csv.DictReader(tiny_csv.open())) + "\n")
    config = {
        "model": {"name": str(tiny_model_dir), "max_length": 32},
        "task": {"data": str(texts), "test_fraction": 0.3},
        "space": {"group_size": 2},
        "recovery": {"mode": "off"},
        "latency": FAST_LATENCY,
        "search": {"trials": 4, "workers": 2},
    }
    results, stdout = _search(folder, config, "fid")
    assert "task: embedding-fidelity" in stdout and "metric: top10_overlap" in stdout
    rows = list(csv.DictReader((results / "fid" / "pareto.csv").open()))
    assert rows and {"top10_overlap", "embedding_cosine"} <= set(rows[0]) and "accuracy" not in rows[0]
    fp32 = next(r for r in csv.DictReader((results / "fid" / "trials.csv").open()) if r["reference"] == "fp32")
    assert float(fp32["embedding_cosine"]) > 0.9999 and float(fp32["top10_overlap"]) > 0.99
    _, children = _runs(results, "fid")
    assert all({"top10_overlap", "embedding_cosine"} <= set(c.data.metrics) for c in children)
