"""A real two-node Ray cluster on this machine (a head and a second node, each with one CPU): a
search reaches it with --address, its trials run on both nodes, results come back to the driver."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slimtune.search.session import end_session, session_processes
from tests.conftest import free_port

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": ""}


def _session_dir(address: str) -> str:
    script = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
              "print(ray._private.worker._global_node.get_session_dir_path())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = tmp_path_factory.mktemp("ray")
    common = ["--num-cpus=1", "--disable-usage-stats", "--include-dashboard=false"]
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    f"--temp-dir={temp}", *common], check=True, capture_output=True, env=ENV, timeout=180)
    session = ""
    try:
        subprocess.run([RAY, "start", f"--address={address}", "--node-ip-address=127.0.0.1", *common[:2]],
                       check=True, capture_output=True, env=ENV, timeout=180)
        session = _session_dir(address)
        yield address
    finally:  # stop this cluster's processes by their PIDs, never `ray stop` (it ends every Ray on the machine)
        end_session(session)
        assert session and not session_processes(session), "processes of the test cluster are still running"


def test_a_search_on_a_two_node_cluster_runs_trials_on_both(two_nodes, tiny_config, tmp_path):
    config = tiny_config(space={"group_size": 1}, recovery={"mode": "off"}, latency={"timed_runs": 10},
                         search={"trials": 8, "workers": 2, "cpus_per_trial": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "slimtune", "search", "--config", "c.yaml", "--address", two_nodes,
                           "--name", "cl", "--results-dir", "results"], capture_output=True, text=True, timeout=900,
                          env=ENV, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = list(csv.DictReader((tmp_path / "results" / "cl" / "trials.csv").open()))
    assert len(trials) == 8 and {t["status"] for t in trials} == {"completed"}
    nodes = {t["node"] for t in trials}
    assert len(nodes) == 2, f"all trials ran on one node ({nodes})"
    for node in sorted(nodes):  # shown with pytest -s
        print(f"node {node[:12]}: {[t['trial'] for t in trials if t['node'] == node]}")
    assert len({t["hardware"] for t in trials}) == 1  # two nodes of one machine: one hardware target
    pareto = list(csv.DictReader((tmp_path / "results" / "cl" / "pareto.csv").open()))
    assert {p.name for p in (tmp_path / "results" / "cl" / "models").iterdir()} == {f"{r['trial']}.onnx" for r in pareto}
    assert all(float(r["search_latency_ms"]) > 0 for r in pareto)
    assert time.monotonic() - started < 900
