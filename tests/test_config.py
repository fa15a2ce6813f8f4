from __future__ import annotations

import pytest

from slimtune.config import Config, ConfigError, config_to_yaml, load_config, parse_duration_s


def test_defaults_are_the_builtin_model_and_task():
    config = load_config(None)
    assert config.model.name == "builtin:all-MiniLM-L6-v2"
    assert config.task.data is None  # the kind's built-in: BBC News, or Python's docs for a causal LM
    assert config.search.sampler == "nsga2"


def test_yaml_narrows_the_space_and_cli_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("space:\n  weight_formats: [fp32, int8]\n  ffn_sparsities: [0.0]\nsearch:\n  trials: 50\n")
    config = load_config(path, {"search": {"trials": 7, "seed": None}})
    assert config.space.weight_formats == ("fp32", "int8")
    assert config.space.ffn_sparsities == (0.0,)
    assert config.search.trials == 7
    assert load_config(None, {"search": {"trials": 7}}) == Config.model_validate(
        {"search": {"trials": 7}}
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("space:\n  weight_format: [int8]\n", "space.weight_format"),
        ("space:\n  ffn_sparsities: [1.5]\n", "fraction must be in [0, 1)"),
        ("space:\n  block_sizes: [48]\n", "4-bit blocks must be among"),
        ("space:\n  weight_formats: [int3]\n", "space.weight_formats"),
        ("search:\n  trials: 1\n", "at least 2"),
        ("- a list\n", "mapping"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_one_line_naming_the_key(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("8h", 28800), ("1.5h", 5400), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-3m", "0", "5 weeks"])
def test_bad_durations(text):
    with pytest.raises(ConfigError):
        parse_duration_s(text)


def test_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, {"search": {"trials": 9}})
    path = tmp_path / "again.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config(path) == config


def test_the_example_config_lists_exactly_the_defaults():
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "minilm-bbc.yaml"
    assert load_config(example) == Config()
