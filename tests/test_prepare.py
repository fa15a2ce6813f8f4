"""prepare(): what a search, an export and the benchmarks start from, found and returned, not printed."""

from __future__ import annotations

from slimtune.config import Config
from slimtune.prepare import prepare


def test_prepare_prints_nothing_and_returns_its_findings(tiny_config, tmp_path, capsys):
    prepared = prepare(Config.model_validate(tiny_config()), tmp_path)
    assert capsys.readouterr().out == ""
    lines = prepared.findings()
    assert lines[0].startswith(f"task: {prepared.task.kind} (") and lines[1].startswith(f"metric: {prepared.task.metric}")
    assert lines[-1].startswith(f"data: {len(prepared.task.input_ids)} held-out texts")
    assert prepared.config.task.kind == prepared.task.kind  # resolved: the logged config reproduces the search
