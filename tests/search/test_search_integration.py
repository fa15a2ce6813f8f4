"""A real small search: local Ray, real Optuna sampling, MLflow on an SQLite file, on a tiny model."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_results_folder_holds_the_front(finished_search):
    results, stdout, name = finished_search.results, finished_search.stdout, finished_search.name
    out = results / name
    rows = list(csv.DictReader((out / "pareto.csv").open()))
    assert rows and {"accuracy", "latency_ms", "size_mb"} <= set(rows[0])
    assert all(r["status"] == "completed" and r["pareto"] == "True" for r in rows)
    assert all(float(r["search_latency_ms"]) > 0 for r in rows)  # the published front was timed again
    assert {p.name for p in (out / "plans").iterdir()} == {f"{r['trial']}.json" for r in rows}
    assert {p.name for p in (out / "models").iterdir()} == {f"{r['trial']}.onnx" for r in rows}
    assert (out / "pareto.html").stat().st_size > 10_000 and (out / "pareto.png").stat().st_size > 10_000
    trials = list(csv.DictReader((out / "trials.csv").open()))
    sampled, recovered = trials[:finished_search.trials], trials[finished_search.trials:]
    assert {t["reference"] for t in sampled[:2]} == {"fp32", "uniform-int8"}  # enqueued first
    assert all(float(t["search_latency_ms"]) > 0 for t in sampled[:2])  # re-timed with the front, on it or not
    # Recovery mode 'front': each shape-changing point of the sampled front was distilled and measured again.
    assert recovered, "the tiny front always holds the enqueued uniform-int8-ffn points, which change shapes"
    originals = {t["trial"]: t for t in sampled}
    for row in recovered:
        steps = int(row["recovery.steps"])  # stopped by the 3 s budget: the steps it did, recorded exactly
        assert row["status"] == "completed" and 0 < steps < finished_search.recovery_steps
        assert row["recovery.flat_patience"] == "0"
        assert originals[row["recovered_from"]]["recovery.steps"] == ""
    assert {t["not_faster"] for t in trials} <= {"True", "False"}
    assert f"Pareto front of {name}" in stdout and "slimtune ui" in stdout
    assert "workflowType=machine_learning" in stdout and "viewStateShareKey=slimtune-front-" in stdout
    assert not list(results.glob(".*.partial"))
    assert not (results / ".work" / name / "measured" / "stale.json").exists()
    assert len({t["hardware"] for t in trials}) == 1 and "/ort" in trials[0]["hardware"] and trials[0]["node"]


def test_mlflow_holds_parent_nested_runs_tags_and_artifacts(finished_search, tmp_path):
    import mlflow.artifacts

    results, name = finished_search.results, finished_search.name
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("slimtune")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and parents[0].info.run_name == name
    recovered = [c for c in children if "slimtune.recovered_from" in c.data.tags]
    assert len(children) - len(recovered) == finished_search.trials and recovered
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.metrics["recover_s"] > 0 and 0 < int(c.data.params["recovery.steps"])
               < finished_search.recovery_steps for c in recovered)
    assert {c.data.tags["slimtune.not_faster"] for c in children} <= {"true", "false"}
    assert all("/ort" in c.data.tags["slimtune.hardware"] and c.data.tags["slimtune.node"] for c in children)
    assert parents[0].data.metrics["hardware_targets"] == 1
    history = client.get_metric_history(parents[0].info.run_id, "hypervolume")
    # one point per completed sampled trial
    assert [m.step for m in history] == list(range(1, finished_search.trials + 1))
    assert history[0].value == 0 and history[-1].value > 0  # fp32 alone spans nothing; compression does
    assert parents[0].data.metrics["final_hypervolume"] > 0  # of the published (re-measured) figures
    assert all({"accuracy", "latency_ms", "size_mb", "export_s"} <= set(c.data.metrics) for c in children)
    assert all("encoder.layer.1.ffn.bits" in c.data.params for c in children)
    pareto_rows = list(csv.DictReader((results / name / "pareto.csv").open()))
    tagged = sorted(c.info.run_name.split()[0] for c in children if c.data.tags["slimtune.pareto"] == "true")
    parts = [(c.info.run_name.split(" | "), c) for c in children]
    assert all(p[0].endswith("[front]") == (c.data.tags["slimtune.pareto"] == "true") for p, c in parts)
    assert any(p[-1] == "fp32" for p, _ in parts)
    assert all(re.fullmatch(r"accuracy \d\.\d{4}", p[1]) and p[2].endswith(" ms") and p[3].endswith(" MB") for p, _ in parts)
    assert not {"pid", "training_iteration", "timestamp", "time_total_s"} & {k for c in children for k in c.data.metrics}
    assert all(round(c.data.metrics["accuracy"], 4) == c.data.metrics["accuracy"] for c in children)
    note = parents[0].data.tags["mlflow.note.content"]
    assert note.startswith("Pareto front:") and note.count("[front]") == len(pareto_rows)
    assert tagged == sorted(r["trial"] for r in pareto_rows)
    front_runs = [c for c in children if c.data.tags["slimtune.pareto"] == "true"]
    assert all(c.data.tags.get("slimtune.remeasured") == "true" and "search_latency_ms" in c.data.metrics
               for c in front_runs)
    retimed = client.get_metric_history(front_runs[0].info.run_id, "latency_ms")
    assert [m.step for m in retimed] == [0, 1]  # search-time, then the published isolated figure
    references = {c.data.tags["slimtune.reference"] for c in children}
    assert {"fp32", "uniform-int8"} <= references
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"pareto.csv", "pareto.html", "pareto.png", "search_config.yaml", "plans"} <= artifacts
    child_artifacts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert "plan.json" in child_artifacts
    for run in front_runs:  # the front's models are MLflow models of their runs, downloadable from the UI
        models = client.search_logged_models([experiment.experiment_id],
                                             filter_string=f"source_run_id = '{run.info.run_id}'")
        assert [m.name for m in models] == ["model"] and client.get_run(run.info.run_id).info.status == "FINISHED"
        requirements = Path(mlflow.artifacts.download_artifacts(f"{models[0].artifact_location}/requirements.txt",
                                                                dst_path=str(tmp_path / run.info.run_id)))
        assert {"onnx", "onnxruntime"} <= {line.split("==")[0] for line in requirements.read_text().splitlines()}
    filtered = client.search_runs([experiment.experiment_id], "params.`encoder.layer.0.ffn.bits` = '32'")
    assert filtered  # dotted params are searchable with backticks, as in the MLflow UI


def test_a_second_search_with_the_same_name_is_refused(finished_search, search_config, tmp_path):
    results, name = finished_search.results, finished_search.name
    done = subprocess.run(
        [sys.executable, "-m", "slimtune", "search", "--config", str(search_config(tmp_path, 2)),
         "--name", name, "--results-dir", str(results)], capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "already exists" in done.stderr


def test_a_local_search_measures_its_kernel_modes_before_its_trials_and_files_them(finished_search):
    stdout = finished_search.stdout
    assert stdout.index("kernel modes of this machine (once, then cached): done") < stdout.index("trial-000")
    (filed,) = (finished_search.results / ".work" / "kernel-modes").glob("*.json")  # kept for later searches
    assert '"figures"' in filed.read_text()
