"""From a finished search's front to a folder that ships: choose (``choose``), rebuild
(``rebuild``), verify (``verify``), package (``package``), register (``registry``).

The chosen point's plan is rebuilt from the original model exactly as the search built it (same
calibration texts, same seeds, same thread count), and the rebuilt file must be byte-identical
to the measured one (SHA-256), score the same on the held-out texts, and (on the same hardware
target) run within ``latency_tolerance`` of the search's published latency. Any mismatch is a
``ReleaseError``; on other hardware the latency is re-measured and reported as new figures.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console

from slimtune.config import Config
from slimtune.evaluators.hardware import current_target
from slimtune.files import staged_folder
from slimtune.phases import Phase, phases_on
from slimtune.plan import CompressionPlan
from slimtune.release.choose import ChoiceError, Rule, choose
from slimtune.release.package import logged_figures, write_shipped
from slimtune.release.rebuild import ReleaseError, rebuild
from slimtune.release.registry import register
from slimtune.release.verify import LatencyTimer, latencies_in_fresh_process, machine_drift, verify_rebuilt


@dataclass(frozen=True)
class ExportedModel:
    """The shipped folder and what was verified: ``figures`` re-measured at export, ``logged`` the
    search's figures for the same point, ``same_hardware`` whether the latencies are comparable."""

    folder: Path
    trial: str
    rule: str
    figures: dict[str, float]
    logged: dict[str, float]
    artifact_sha256: str
    same_hardware: bool


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open())) if path.is_file() else []


def export_search(name: str, out: Path, rule: Rule, results: Path = Path("results"),
                  latency_tolerance: float = 0.25, console: Console | None = None,
                  timer: LatencyTimer | None = None) -> ExportedModel:
    """Choose a point of search ``name``'s front by ``rule``, rebuild and verify it, write ``out``.

    ``timer`` times the rebuilt file and other front points' files (``latencies_in_fresh_process``
    by default: a process of its own, under the node lock)."""
    from slimtune.prepare import prepare

    console = console or Console(quiet=True)
    folder = results / name
    rows = _rows(folder / "pareto.csv")
    if not (folder / "search_config.yaml").is_file() or not rows:
        raise ChoiceError(f"no finished search {name!r} in {results}: give the --name of a search that finished")
    if out.exists():
        raise ChoiceError(f"{out} already exists: choose another --out or remove it")
    config = Config.model_validate(yaml.safe_load((folder / "search_config.yaml").read_text()))
    metric = config.task.metric
    fp32 = next((r for r in _rows(folder / "trials.csv") if r["reference"] == "fp32" and r["status"] == "completed"), None)
    row = choose(rows, rule, metric, float(fp32[metric]) if fp32 else None)
    console.print(f"chosen: {row['trial']} ({rule.describe(metric)}): {metric} {float(row[metric]):.4f}, "
                  f"{float(row['latency_ms']):.1f} ms, {float(row['size_mb']):.2f} MB")
    plan = CompressionPlan.loads((folder / "plans" / f"{row['trial']}.json").read_text())
    prepared = prepare(config, results, phases_on(console))
    for line in prepared.findings():
        console.print(line)
    task, model = prepared.task, prepared.loaded.module
    if not row.get("artifact_sha256"):
        console.print(f"{row['trial']} has no recorded SHA-256 (an older search): its bytes cannot be compared")
    with staged_folder(out) as staging:
        artifact = staging / "artifact.onnx"
        with Phase(console, f"rebuilding {row['trial']} from {config.model.name}"):
            digest = rebuild(row, plan, model, task, config, artifact)
        with Phase(console, f"verifying {row['trial']}: bytes, held-out quality, latency beside other front points"):
            figures = verify_rebuilt(artifact, row, task, config, latency_tolerance, rows, folder / "models",
                                     timer or latencies_in_fresh_process)
        write_shipped(staging, artifact, row, plan, task, prepared.loaded.tokenizer, figures,
                      logged_figures(fp32, figures), name, digest)
    return ExportedModel(out, row["trial"], rule.describe(metric), {k: v["value"] for k, v in figures.items()},
                         logged_figures(row, figures), digest, row.get("hardware") == current_target().key)


__all__ = ["ChoiceError", "ExportedModel", "LatencyTimer", "ReleaseError", "Rule", "export_search", "machine_drift",
           "register"]
