"""A search whose driver is killed with SIGKILL mid-search is resumed: nothing lost, nothing twice,
nothing left running."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from slimtune.search.session import JOURNAL_FILE, STATE_FILE, session_processes

pytestmark = pytest.mark.slow

TRIALS = 6


def test_a_search_killed_with_sigkill_resumes_without_loss_or_duplicates(tiny_config, tmp_path):
    results = tmp_path / "results"
    work = results / ".work" / "night"
    env = {**os.environ, "RAY_ADDRESS": ""}
    command = [sys.executable, "-m", "slimtune", "search", "--results-dir", str(results)]
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(tiny_config(space={"group_size": 1}, recovery={"mode": "off"},
                                                 latency={"timed_runs": 20},
                                                 search={"trials": TRIALS, "workers": 1, "seed": 5})))
    driver = subprocess.Popen(command + ["--config", str(config), "--name", "night"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    journal = work / JOURNAL_FILE
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and driver.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the search ended before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = [json.loads(line) for line in journal.read_text().splitlines()]
    session = json.loads((work / STATE_FILE).read_text())["ray_session"]
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("slimtune").experiment_id
    assert any(r.info.status == "RUNNING" for r in client.search_runs([experiment]))  # what the kill left

    runs_before = client.search_runs([experiment])
    print(f"before the kill: {len(before)} trials finished; MLflow {len(runs_before)} runs "
          f"({sum(r.info.status == 'RUNNING' for r in runs_before)} RUNNING)")
    resumed = subprocess.run(command + ["--resume", "night"], capture_output=True, text=True, timeout=900, env=env,
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resume: {len(before)} finished trials kept" in " ".join(resumed.stdout.split())

    trials = list(csv.DictReader((results / "night" / "trials.csv").open()))
    assert len(trials) == TRIALS and {t["status"] for t in trials} <= {"completed", "failed"}
    kept = {t["trial"]: t for t in trials}
    for old in before:  # finished before the kill: kept as they were, not run again
        assert kept[f"trial-{old['number']:03d}"]["plan_digest"] == old["metrics"]["plan_digest"]
    runs = client.search_runs([experiment], max_results=1000)
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    trial_ids = [c.data.tags["slimtune.trial_id"] for c in children]
    assert len(trial_ids) == len(set(trial_ids))  # no trial logged twice
    assert "RUNNING" not in {c.info.status for c in children}
    assert sum(c.info.status in ("FINISHED", "FAILED") for c in children) == TRIALS
    killed = [c for c in children if c.info.status == "KILLED"]
    assert all("driver died" in c.data.tags["slimtune.error"] for c in killed)
    print(f"after the resume: {len(trials)} trials; MLflow {len(runs)} runs: "
          f"{', '.join(f'{s} {sum(r.info.status == s for r in runs)}' for s in ('FINISHED', 'FAILED', 'KILLED'))}; "
          + " ".join(line for line in resumed.stdout.splitlines() if "resum" in line))
    assert session and session_processes(session) == []  # nothing of the dead driver's Ray is left
    assert not work.exists()
