"""slimtune export on a real finished search: rebuilt byte for byte, verified, shipped as a folder
that runs with onnxruntime and the tokenizer alone."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(finished_search):
    """This module's copy of the shared search (tests/conftest.py): recovery there is stopped by its
    budget, so the recovered points' plans record the steps they did."""
    return finished_search.folder


@pytest.fixture
def export_cli(cli):
    """The CLI export of the search ``night``; latency is checked only loosely (within 10x after the
    machine's drift): a tiny model's sub-millisecond timings are noise-bound, and the latency rule
    has its own tests below."""

    def run(folder, *args, tolerance="9"):
        return cli("export", "night", "--results-dir", "results", "--latency-tolerance", tolerance, *args, cwd=folder)

    return run


def _timed_here(paths, feeds, config):
    """Real ONNX Runtime timings, in this process (the CLI tests use the default fresh process)."""
    from slimtune.evaluators import as_dict
    from slimtune.evaluators.latency import measure_latency

    return [as_dict(measure_latency(path, feeds, config.latency)) for path in paths]


def test_every_front_point_rebuilds_to_the_measured_bytes_and_ships(finished):
    from slimtune.release import Rule, export_search

    front = list(csv.DictReader((finished / "results" / "night" / "pareto.csv").open()))
    recovered = [r for r in csv.DictReader((finished / "results" / "night" / "trials.csv").open()) if r["recovered_from"]]
    assert recovered and all(0 < int(r["recovery.steps"]) < 100_000 and r["recovery.flat_patience"] == "0"
                             for r in recovered)
    for row in front:
        shipped = finished / f"ship-{row['trial']}"
        export_search("night", shipped, Rule(trial=row["trial"]), finished / "results", latency_tolerance=9.0,
                      timer=_timed_here)
        metrics = json.loads((shipped / "metrics.json").read_text())
        assert metrics["artifact_sha256"] == row["artifact_sha256"]
        assert metrics["export"]["accuracy"]["value"] == pytest.approx(float(row["accuracy"]), abs=1e-6)
        assert metrics["export_hardware_target"] == row["hardware"] and metrics["outputs"][-1] == "probabilities"
        assert {"model.onnx", "tokenizer.json", "plan.json", "labels.json", "README.md"} <= {
            p.name for p in shipped.iterdir()}


def _scaled_timer(front: list[dict[str, str]], chosen: str, own: float, others: float):
    """A timer that reports the rebuilt file (the first, trial ``chosen``) at ``own`` x and the other
    front points at ``others`` x their published latency: a slow file, or a slow machine."""
    published = {row["trial"]: float(row["latency_ms"]) for row in front}

    def timer(paths, feeds, config):
        return [{"latency_ms": published[chosen] * own}] + [{"latency_ms": published[p.stem] * others}
                                                           for p in paths[1:]]

    return timer


def test_a_rebuilt_file_slower_than_measured_fails_and_a_slower_machine_does_not(finished):
    import shutil

    from slimtune.release import ReleaseError, Rule, export_search

    night = finished / "results" / "night"
    original = (night / "pareto.csv").read_text()
    front = list(csv.DictReader(original.splitlines()))
    trial = front[0]["trial"]
    # a second front point to time the machine's drift on, whatever the tiny front holds: a copy
    twin = {**front[0], "trial": "trial-999"}
    shutil.copy(night / "models" / f"{trial}.onnx", night / "models" / "trial-999.onnx")
    with (night / "pareto.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(front[0]))
        writer.writeheader()
        writer.writerows([front[0], twin])
    try:
        with pytest.raises(ReleaseError, match=r"x3\.00 of the search's .* drift of x1\.00.* tolerance of 25%"):
            export_search("night", finished / "slow-file", Rule(trial=trial), finished / "results",
                          timer=_scaled_timer([front[0], twin], trial, own=3.0, others=1.0))
        assert not (finished / "slow-file").exists() and not (finished / ".slow-file.partial").exists()
        exported = export_search("night", finished / "slow-machine", Rule(trial=trial), finished / "results",
                                 timer=_scaled_timer([front[0], twin], trial, own=3.0, others=3.0))
        assert exported.figures["machine_drift"] == pytest.approx(3.0)
    finally:
        (night / "pareto.csv").write_text(original)
        (night / "models" / "trial-999.onnx").unlink()


def test_the_shipped_folder_runs_with_onnxruntime_and_the_tokenizer_alone(finished, export_cli, tiny_csv):
    row = next(csv.DictReader((finished / "results" / "night" / "pareto.csv").open()))
    assert export_cli(finished, "--trial", row["trial"], "--out", "alone").returncode == 0
    texts = [r["body"] for r in csv.DictReader(tiny_csv.open())][:5]
    script = "\n".join([  # what the model card shows: no slimtune, no transformers
        "import json, sys, numpy as np, onnxruntime as ort",
        "from tokenizers import Tokenizer",
        "tok = Tokenizer.from_file('tokenizer.json'); tok.enable_truncation(32); tok.enable_padding()",
        "enc = tok.encode_batch(json.loads(sys.argv[1]))",
        "feeds = {'input_ids': np.array([e.ids for e in enc], np.int64),",
        "         'attention_mask': np.array([e.attention_mask for e in enc], np.int64)}",
        "emb, prob = ort.InferenceSession('model.onnx').run(None, feeds)",
        "labels = json.load(open('labels.json'))",
        "print(json.dumps({'labels': [labels[i] for i in prob.argmax(1)], 'sums': prob.sum(1).tolist()}))",
    ])
    done = subprocess.run([sys.executable, "-c", script, json.dumps(texts)], capture_output=True, text=True,
                          cwd=finished / "alone", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert np.allclose(result["sums"], 1.0, atol=1e-5) and set(result["labels"]) <= {"money", "sport", "tech"}
    assert "## Run it" in (finished / "alone" / "README.md").read_text()


def test_rules_choose_and_explain(finished, export_cli):
    done = export_cli(finished, "--max-latency-ms", "0.0001", "--out", "never")
    assert done.returncode == 2 and "no front point has latency <= 0.0001 ms" in " ".join(done.stderr.split())
    assert "misses latency_ms by" in done.stderr and not (finished / "never").exists()
    knee = export_cli(finished, "--knee", "--out", "knee")  # the default timer: a process of its own
    assert knee.returncode == 0, knee.stderr[-2000:]
    assert export_cli(finished, "--max-drop", "50", "--prefer", "smallest", "--out", "small").returncode == 0


def test_a_file_that_is_not_the_measured_one_fails_loudly(finished, export_cli):
    pareto = finished / "results" / "night" / "pareto.csv"
    original = pareto.read_text()
    rows = list(csv.DictReader(original.splitlines()))
    rows[0]["artifact_sha256"] = "0" * 64
    with pareto.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        done = export_cli(finished, "--trial", rows[0]["trial"], "--out", "tampered")
    finally:
        pareto.write_text(original)
    assert done.returncode == 2 and "differs from the measured file" in " ".join(done.stderr.split())
    assert not (finished / "tampered").exists() and not (finished / ".tampered.partial").exists()


def test_the_registered_model_predicts_what_the_onnx_file_does(finished, tiny_csv):
    import mlflow
    import onnxruntime as ort
    import pandas as pd
    from tokenizers import Tokenizer

    row = next(csv.DictReader((finished / "results" / "night" / "pareto.csv").open()))
    # as its own process, the way a user runs it: registration is where MLflow's process state is used
    done = subprocess.run([sys.executable, "-m", "slimtune", "export", "night", "--results-dir", "results",
                           "--latency-tolerance", "9", "--trial", row["trial"], "--out", "registered",
                           "--register", "tiny-topics", "--alias", "champion"], capture_output=True, text=True,
                          timeout=900, cwd=finished)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "models:/tiny-topics@champion" in " ".join(done.stdout.split())
    texts = [r["body"] for r in csv.DictReader(tiny_csv.open())][:6]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{finished / 'results' / 'mlflow.db'}")
    try:
        predicted = mlflow.pyfunc.load_model("models:/tiny-topics@champion").predict(pd.DataFrame({"text": texts}))
    finally:
        mlflow.set_tracking_uri(previous)
    shipped = finished / "registered"
    metrics = json.loads((shipped / "metrics.json").read_text())
    tok = Tokenizer.from_file(str(shipped / "tokenizer.json"))
    tok.enable_truncation(metrics["tokenizer"]["max_length"])
    tok.enable_padding(pad_id=metrics["tokenizer"]["pad_id"], pad_token=metrics["tokenizer"]["pad_token"])
    enc = tok.encode_batch(texts)
    feeds = {"input_ids": np.array([e.ids for e in enc], np.int64),
             "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}
    _, prob = ort.InferenceSession(str(shipped / "model.onnx")).run(None, feeds)
    labels = json.loads((shipped / "labels.json").read_text())
    assert list(predicted["label"]) == [labels[i] for i in prob.argmax(1)]
    np.testing.assert_allclose(predicted[[f"p_{label}" for label in labels]].to_numpy(), prob, atol=1e-6)


def _apply(cli, folder, plan, model, out):
    return cli("apply", str(plan), "--model", str(model), "--search", "night", "--out", out, "--results-dir", "results",
               cwd=folder)


def test_a_plan_applies_to_a_retrained_checkpoint_and_refuses_another_layout(finished, tiny_model_dir, cli):
    import torch
    from transformers import AutoTokenizer, BertModel

    plans = sorted((finished / "results" / "night" / "plans").iterdir())
    retrained = BertModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for parameter in retrained.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    retrained.save_pretrained(finished / "retrained")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(finished / "retrained")
    done = _apply(cli, finished, plans[-1], finished / "retrained", "applied")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    metrics = json.loads((finished / "applied" / "metrics.json").read_text())
    assert {"accuracy", "latency_ms", "size_mb"} <= set(metrics["figures"]) and (finished / "applied" / "model.onnx").is_file()
    assert set(metrics["kernel_modes"]) == {"levels", "symmetric"}  # measured on this machine, as a search does

    shallow = BertModel(retrained.config.__class__(**{**retrained.config.to_dict(), "num_hidden_layers": 1}))
    shallow.save_pretrained(finished / "shallow")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(finished / "shallow")
    layer_plans = [p for p in plans if "encoder.layer.1" in p.read_text()]
    done = _apply(cli, finished, layer_plans[0], finished / "shallow", "never")
    assert done.returncode == 2 and "modules this model does not have" in " ".join(done.stderr.split())
    assert not (finished / "never").exists()
