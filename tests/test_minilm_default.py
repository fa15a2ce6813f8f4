"""The real built-in default: all-MiniLM-L6-v2 on BBC News, on a small held-out subset."""

from __future__ import annotations

import csv

import pytest
import yaml
from typer.testing import CliRunner

from slimtune.cli import app

pytestmark = pytest.mark.slow


def test_baseline_on_the_builtin_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a stratified third of the training texts: the head is fitted on the uncompressed model's
    # embeddings of each, which is most of this test's time
    config = {"task": {"eval_limit": 120, "train_limit": 600}, "latency": {"timed_runs": 5, "warmup_runs": 1}}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["baseline", "--config", "small.yaml", "--name", "b"])
    assert result.exit_code == 0, result.output
    rows = {r["variant"].split()[0] + r["variant"].split()[1] if r["variant"] != "fp32" else "fp32": r
            for r in csv.DictReader((tmp_path / "results" / "b" / "baseline.csv").open())}
    fp32, int8, int4 = rows["fp32"], rows["uniformint8"], rows["uniformint4"]
    assert float(fp32["accuracy"]) >= 0.93
    assert float(int8["accuracy"]) >= float(fp32["accuracy"]) - 0.03
    assert float(int4["accuracy"]) >= float(fp32["accuracy"]) - 0.05
    assert 85 < float(fp32["size_mb"]) < 95  # 22.7M parameters in fp32
    assert float(int8["size_mb"]) < 0.3 * float(fp32["size_mb"])
    assert float(int4["size_mb"]) < float(int8["size_mb"])
    assert "MatMulInteger" in int8["kernels"] and "MatMulNBits" in int4["kernels"]
    assert not list((tmp_path / "results" / "b").glob("*.onnx"))
