"""`slimtune ui` serves a real MLflow server on 127.0.0.1, and a search logs to it by URI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port

pytestmark = pytest.mark.slow


def _wait_healthy(url: str, server: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, "the MLflow server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


def test_search_logs_to_the_server_that_ui_started(tmp_path, search_config):
    results = tmp_path / "results"
    results.mkdir()
    MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}").search_experiments()  # creates the store
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "slimtune", "ui", "--port", str(port), "--results-dir", str(results)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_healthy(url, server)
        config = search_config(tmp_path, 2)
        done = subprocess.run(
            [sys.executable, "-m", "slimtune", "search", "--config", str(config), "--name", "remote",
             "--tracking-uri", url, "--results-dir", str(tmp_path / "other-results")],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        client = MlflowClient(tracking_uri=url)
        runs = client.search_runs([client.get_experiment_by_name("slimtune").experiment_id])
        parent = next(r for r in runs if r.info.run_name == "remote")
        assert sum(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs) == 2
        assert "pareto.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert not (tmp_path / "other-results" / "mlflow.db").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
