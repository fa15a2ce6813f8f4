"""Bad input: one line naming the problem and the fix, exit code 2, nothing written."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from slimtune.cli import app


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["search", "--config", "nope.yaml"], "does not exist"),
        (["search", "--time-budget", "soon"], "not a duration"),
        (["search", "--trials", "1"], "at least 2"),
        (["search", "--sampler", "grid"], "search.sampler"),
        (["search", "--name", "../escape"], "--name"),
        (["baseline", "--config", "bad.yaml"], "space.weight_format"),
        (["search", "--config", "badmodel.yaml"], "cannot load model"),
        (["ui"], "no MLflow store"),
        (["search", "--tracking-uri", "http://127.0.0.1:9"], "no MLflow server answers"),
        (["search", "--tracking-uri", "bogus://nowhere"], "MLflow has no tracking store for 'bogus://nowhere'"),
        (["search", "--address", "127.0.0.1:9"], "no Ray cluster answers at 127.0.0.1:9"),
        (["search", "--address", "headnode"], "is not HOST:PORT"),
        (["search", "--config", "latin1.yaml"], "is not valid utf-8 text"),
        (["search", "--resume", "nothing"], "no search to resume"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("space:\n  weight_format: [int8]\n")
    (tmp_path / "badmodel.yaml").write_text(f"model:\n  name: {tmp_path / 'no-such-model'}\n")
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    (tmp_path / "latin1.yaml").write_text(f"task:\n  data: {tmp_path / 'latin1.csv'}\n")
    started = time.monotonic()
    result = CliRunner().invoke(app, args)
    assert time.monotonic() - started < 30  # before any model is loaded
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split())
    assert not (tmp_path / "results").exists() or not any(
        p.name not in (".cache",) for p in (tmp_path / "results").iterdir())
