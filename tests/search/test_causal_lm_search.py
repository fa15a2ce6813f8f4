"""A real small search of a causal LM (a random Llama with grouped-query attention): local Ray,
Optuna, MLflow on an SQLite file, generation latency in ONNX Runtime; then its export."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from mlflow.tracking import MlflowClient

from slimtune.export.modes import EXACT, KernelModes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm_search(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("lm")
    config = {
        "model": {"name": str(tiny_llama_dir), "max_length": 32},
        "task": {"eval_limit": 16},
        "space": {"group_size": 3, "weight_formats": ["fp32", "int8", "int4"], "block_sizes": [32],
                  "int4_methods": ["rtn"], "head_fractions": [0.0, 0.5], "ffn_sparsities": [0.0, 0.5],
                  "rank_fractions": [1.0], "embedding_formats": ["fp32", "int4"], "embedding_block_sizes": [32]},
        "recovery": {"steps": 3, "batch_size": 2, "front_points": 1},
        "latency": {"batch_size": 1, "sequence_length": 16, "new_tokens": 4, "threads": 1, "warmup_runs": 1,
                    "timed_runs": 3},
        "search": {"trials": 7, "workers": 2, "seed": 0, "quality_floor": 0.5},
    }
    path = folder / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    results = folder / "results"
    done = subprocess.run([sys.executable, "-m", "slimtune", "search", "--config", str(path), "--name", "lm",
                           "--results-dir", str(results)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_ADDRESS": ""}, cwd=folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return results, done.stdout


def test_a_causal_lm_search_minimises_perplexity_and_times_generation(lm_search):
    results, stdout = lm_search
    assert "task: causal-lm" in stdout and "metric: perplexity" in stdout
    trials = list(csv.DictReader((results / "lm" / "trials.csv").open()))
    references = {row["reference"] for row in trials}
    assert {"fp32", "uniform-int4"} <= references  # no uniform int8: the tables offer no int8 here
    done = [row for row in trials if row["status"] == "completed"]
    assert len(done) >= 6
    for row in done:
        assert float(row["ttft_ms"]) > 0 and float(row["tokens_per_s"]) > 0 and float(row["perplexity"]) > 1
    fp32 = next(row for row in done if row["reference"] == "fp32")
    assert float(fp32["next_token_agreement"]) == 1.0
    # Every trial says which exporter wrote it (the fused decoder for a Llama) and the kernel modes
    # it was built with: the ones measured on this machine, one set for the whole search, for every
    # trial with blockwise weights; exact for the others, which the modes do not change (fp32).
    assert {row["exporter"] for row in done} == {"fused-decoder"}
    blockwise = [row for row in done if "MatMulNBits" in row["kernels"]]
    assert blockwise and len({row["kernel_modes"] for row in blockwise}) == 1
    assert fp32["kernel_modes"] == EXACT.dumps()
    measured = json.loads((results / "lm" / "kernel_modes.json").read_text())
    (target, found), = measured.items()
    assert target == done[0]["hardware"]
    assert KernelModes.loads(json.dumps(found["modes"])).dumps() == blockwise[0]["kernel_modes"]
    assert {(f["bits"], f["level"], f["symmetric"]) for f in found["figures"]} == {
        (4, level, symmetric) for level in (0, 4) for symmetric in (False, True)}
    assert f"kernel modes on {target}: {found['described']}" in stdout
    front = list(csv.DictReader((results / "lm" / "pareto.csv").open()))
    assert front and list(front[0]).index("perplexity") < list(front[0]).index("latency_ms")
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("slimtune").experiment_id], max_results=100)
    child = next(r for r in runs if "fp32" in r.info.run_name)
    assert {"perplexity", "next_token_agreement", "ttft_ms", "tokens_per_s", "latency_ms"} <= set(child.data.metrics)
    assert child.data.tags["slimtune.exporter"] == "fused-decoder" and "levels" in child.data.tags["slimtune.kernel_modes"]


def test_the_chosen_point_ships_as_a_decoder_that_generates(lm_search, tmp_path):
    results, _ = lm_search
    out = tmp_path / "shipped"
    done = subprocess.run([sys.executable, "-m", "slimtune", "export", "lm", "--out", str(out), "--results-dir",
                           str(results), "--max-drop", "50", "--latency-tolerance", "5"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task_kind"] == "causal-lm" and "ttft_ms" in metrics["export"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert names[0] == "logits" and names[1].startswith("present.")
    assert "KV cache" in (out / "README.md").read_text()
    from slimtune.release.pyfunc import ShippedModel

    class Context:
        artifacts = {"shipped": str(out)}

    model = ShippedModel()
    model.load_context(Context())
    generated = model.predict(None, ["def main():", "import os"], params={"max_new_tokens": 5})
    assert list(generated.columns) == ["generated"] and len(generated) == 2
    assert all(isinstance(text, str) for text in generated["generated"])
    assert np.isfinite(metrics["export"]["perplexity"]["value"])
