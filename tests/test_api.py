"""The Python API: the CLI's jobs as typed functions with typed results and the same errors."""

from __future__ import annotations

import pytest

from slimtune import api
from slimtune.config import ConfigError
from slimtune.release import ChoiceError, Rule


def test_config_from_a_dict_a_path_or_nothing(tmp_path):
    assert api.as_config(None).search.trials == 24
    assert api.as_config({"search": {"trials": 5}}).search.trials == 5
    (tmp_path / "c.yaml").write_text("search:\n  trials: 7\n")
    assert api.as_config(tmp_path / "c.yaml").search.trials == 7
    with pytest.raises(ConfigError, match=r"^search\.trials: .*greater than or equal to 1$"):
        api.as_config({"search": {"trials": 0}})  # one line naming the key, as the CLI prints it


@pytest.mark.slow
def test_search_then_export_from_python(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "")
    config = tiny_config(recovery={"mode": "off"}, latency={"timed_runs": 10}, search={"trials": 4, "workers": 1})
    result = api.search(config, name="py", results_dir=tmp_path / "results")
    assert len(result.records) == 4 and result.front
    table = result.front_table()
    assert {"trial", "accuracy", "latency_ms", "size_mb"} <= set(table.columns) and table["accuracy"].dtype.kind == "f"
    exported, registered = api.export("py", tmp_path / "shipped", Rule(prefer="fastest"),
                                      results_dir=tmp_path / "results", latency_tolerance=1.0)
    assert registered is None and (exported.folder / "model.onnx").is_file() and exported.same_hardware
    assert exported.figures["accuracy"] == pytest.approx(exported.logged["accuracy"], abs=1e-6)
    with pytest.raises(ChoiceError, match="already exists"):
        api.export("py", tmp_path / "shipped", results_dir=tmp_path / "results")
