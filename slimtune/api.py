"""slimtune from Python, for notebooks and pipelines: every CLI job as a typed function.

Each function raises the same one-line errors the CLI prints (``ConfigError``, ``DataError``,
``ModelLoadError``, ``ChoiceError``, ``ReleaseError``, ...) and returns a value instead of a
printed table. Output goes to a Rich console only when ``quiet=False``.

    from slimtune import api
    result = api.search({"search": {"trials": 24}}, name="night")
    print(result.front_table())
    shipped = api.export("night", "shipped/", api.Rule(max_drop=0.5), register="topics", alias="champion")
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from slimtune.config import Config, ConfigError, config_from_mapping, load_config
from slimtune.release import ExportedModel, Rule, export_search, register
from slimtune.release.apply import AppliedPlan, apply_plan
from slimtune.search.records import TrialRecord

ConfigLike = Config | Path | str | dict[str, Any] | None


def as_config(config: ConfigLike) -> Config:
    """A Config from a Config, a YAML path, a dict of sections, or None (the defaults)."""
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return config_from_mapping(config)
    return load_config(Path(config) if config is not None else None)


def _console(quiet: bool, console: Console | None = None) -> Console:
    return console or Console(quiet=quiet, log_path=False)


@dataclass(frozen=True)
class SearchResult:
    """A finished search: every trial's record, and its front as rows of ``pareto.csv``."""

    name: str
    folder: Path
    records: list[TrialRecord]
    front: list[dict[str, str]]

    def front_table(self):
        """The front as a pandas DataFrame (one row per Pareto-optimal trial, figures as numbers)."""
        import pandas as pd

        frame = pd.DataFrame(self.front)
        for column in frame.columns:
            numbers = pd.to_numeric(frame[column], errors="coerce")
            if numbers.notna().all():
                frame[column] = numbers
        return frame


def search(config: ConfigLike = None, name: str | None = None, results_dir: Path = Path("results"),
           resume: bool = False, quiet: bool = True, console: Console | None = None,
           address: str | None = None) -> SearchResult:
    """Run a search (or ``resume`` the one called ``name``, with its own config; ``address`` may point
    it at another Ray cluster now); results in ``results_dir/name``."""
    from slimtune.workflow import run_search_job

    name = name or f"search-{dt.datetime.now():%Y%m%d-%H%M%S}"
    if resume:
        import yaml

        from slimtune.search.session import ResumeError, SearchState

        state = SearchState.load(results_dir / ".work" / name)
        cfg, out = Config.model_validate(yaml.safe_load(state.config_yaml)), Path(state.out)
        if out.exists():
            raise ResumeError(f"search {name!r} already finished ({out} exists): nothing to resume")
        if address:
            cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"address": address})})
    else:
        cfg, out = as_config(config), results_dir / name
        if out.exists():
            raise ConfigError(f"{out} already exists: choose another name or remove that folder")
    records, _ = run_search_job(cfg, name, out, results_dir, _console(quiet, console), resume=resume)
    return SearchResult(name, out, records, list(csv.DictReader((out / "pareto.csv").open())))


def baseline(config: ConfigLike = None, name: str | None = None, results_dir: Path = Path("results"),
             quiet: bool = True) -> list[dict[str, float | str]]:
    """fp32, uniform int8 and uniform 4-bit measured side by side; one dict of figures per variant."""
    from slimtune.workflow import run_baseline_job

    name = name or f"baseline-{dt.datetime.now():%Y%m%d-%H%M%S}"
    return run_baseline_job(as_config(config), results_dir / name, results_dir, _console(quiet))


def export(search_name: str, out: Path | str, rule: Rule | None = None, results_dir: Path = Path("results"),
           latency_tolerance: float = 0.25, register_as: str | None = None, alias: str | None = None,
           tracking_uri: str | None = None, quiet: bool = True,
           console: Console | None = None) -> tuple[ExportedModel, str | None]:
    """Choose a front point by ``rule`` (default: the most accurate), rebuild, verify and ship it;
    optionally register it. Returns the export and the registered ``models:/`` URI (or None)."""
    import yaml

    from slimtune.tracking import default_tracking_uri

    exported = export_search(search_name, Path(out), rule or Rule(), results_dir, latency_tolerance,
                             _console(quiet, console))
    if not register_as:
        return exported, None
    cfg = Config.model_validate(yaml.safe_load((results_dir / search_name / "search_config.yaml").read_text()))
    uri = tracking_uri or cfg.tracking.uri or default_tracking_uri(results_dir)
    return exported, register(exported, search_name, register_as, alias, uri, cfg.tracking.experiment)


def apply(plan: Path | str, model: str, out: Path | str, config: ConfigLike = None,
          results_dir: Path = Path("results"), quiet: bool = True, console: Console | None = None) -> AppliedPlan:
    """Compress a retrained checkpoint ``model`` with ``plan`` and measure it on ``config``'s task."""
    return apply_plan(Path(plan), model, as_config(config), Path(out), results_dir, _console(quiet, console))


__all__ = ["AppliedPlan", "ExportedModel", "Rule", "SearchResult", "apply", "as_config", "baseline", "export",
           "search"]
