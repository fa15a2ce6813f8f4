"""A rebuild reads the build's thread count back from the trial that measured it."""

from __future__ import annotations

import csv
import os

import yaml

from slimtune.config import Config
from slimtune.release.rebuild import recorded_build_threads


def test_every_trial_records_its_build_threads_and_a_rebuild_reads_them(finished_search):
    folder = finished_search.folder / "results" / finished_search.name
    config = Config.model_validate(yaml.safe_load((folder / "search_config.yaml").read_text()))
    rows = [r for r in csv.DictReader((folder / "trials.csv").open()) if r["status"] == "completed"]
    sampled = [r for r in rows if not r["recovered_from"]]
    recovered = [r for r in rows if r["recovered_from"]]
    assert sampled and all(int(r["build_threads"]) == max(1, int(config.search.cpus_per_trial)) for r in sampled)
    assert all(int(r["build_threads"]) == (os.cpu_count() or 1) for r in recovered)  # front recovery: every core
    recorded = {**rows[0], "build_threads": "7"}  # read back, not recomputed from the config
    assert recorded_build_threads(recorded, config) == 7


def test_a_search_from_before_the_threads_were_recorded_gets_its_rule_of_then():
    config = Config()
    assert recorded_build_threads({"recovered_from": ""}, config) == max(1, int(config.search.cpus_per_trial))
    assert recorded_build_threads({"recovered_from": "trial-003"}, config) == (os.cpu_count() or 1)
