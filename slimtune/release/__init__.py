"""From a finished search's front to a folder that ships: choose, rebuild, verify, package.

The chosen point's plan is rebuilt from the original model exactly as the search built it (same
calibration texts, same seeds, same thread count), and the rebuilt file must be byte-identical
to the measured one (SHA-256), score the same on the held-out texts, and (on the same hardware
target) run within ``latency_tolerance`` of the search's published latency. Any mismatch is a
``ReleaseError``; on other hardware the latency is re-measured and reported as new figures.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
import yaml
from rich.console import Console

from slimtune.config import Config
from slimtune.evaluators.hardware import current_target
from slimtune.evaluators.latency import latency_inputs
from slimtune.evaluators.quality import measure_quality
from slimtune.export import KernelModes, build_artifact
from slimtune.export.size import file_sha256
from slimtune.phases import Phase
from slimtune.plan import CompressionPlan
from slimtune.release.choose import ChoiceError, Rule, choose
from slimtune.release.package import model_card, with_probabilities, write_json
from slimtune.search.trial import task_calibration


class ReleaseError(RuntimeError):
    """The chosen point could not be rebuilt as measured; the message says what differs."""


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


def _plan_summary(plan: CompressionPlan) -> str:
    formats = Counter(f"{spec.format}" + (f" ({spec.method}, block {spec.block_size})" if spec.is_blockwise else "")
                      for spec in plan.quantize.values())
    lines = [f"- weights: {', '.join(f'{n} x {f}' for f, n in formats.most_common()) or 'all fp32'}"]
    if plan.depth_prune:
        lines.append(f"- blocks removed: {', '.join(plan.depth_prune)}")
    if plan.head_prune:
        lines.append(f"- attention heads removed (fraction per block): {dict(plan.head_prune)}")
    if plan.ffn_prune:
        lines.append(f"- FFN neurons removed (fraction per block): {dict(plan.ffn_prune)}")
    if plan.low_rank:
        lines.append(f"- low-rank ({plan.low_rank_method}), rank fraction per layer: {dict(plan.low_rank)}")
    if plan.recovery is not None:
        lines.append(f"- distillation recovery: {plan.recovery.steps} steps of {plan.recovery.batch_size} texts")
    return "\n".join(lines)


def export_search(name: str, out: Path, rule: Rule, results: Path = Path("results"),
                  latency_tolerance: float = 0.25, console: Console | None = None,
                  timer: LatencyTimer | None = None) -> ExportedModel:
    """Choose a point of search ``name``'s front by ``rule``, rebuild and verify it, write ``out``.

    ``timer`` times the rebuilt file and other front points' files (``_latencies_in_fresh_process``
    by default: a process of its own, under the node lock)."""
    from slimtune.workflow import prepare

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
    prepared = prepare(config, results, console)
    task, model = prepared.task, prepared.loaded.module
    # the thread count the search built it with: trials use cpus_per_trial, front recovery every core
    threads = (os.cpu_count() or 1) if row.get("recovered_from") else max(1, int(config.search.cpus_per_trial))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)  # restored below: the caller's torch settings are its own
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if not row.get("artifact_sha256"):
        console.print(f"{row['trial']} has no recorded SHA-256 (an older search): its bytes cannot be compared")
    try:
        with Phase(console, f"rebuilding {row['trial']} from {config.model.name}"):
            artifact = build_artifact(model, plan, staging / "artifact.onnx", task_calibration(model, task), task.output,
                                      modes=KernelModes.loads(row.get("kernel_modes")))
        digest = file_sha256(artifact.path)
        if row.get("artifact_sha256") and digest != row["artifact_sha256"]:
            raise ReleaseError(f"the rebuilt {row['trial']} differs from the measured file (SHA-256 {digest[:12]} vs "
                               f"{row['artifact_sha256'][:12]}): the model, its files or this environment changed")
        with Phase(console, f"verifying {row['trial']}: bytes, held-out quality, latency beside other front points"):
            figures = _verify(artifact.path, row, task, config, latency_tolerance, rows, folder / "models",
                              timer or _latencies_in_fresh_process)
        _package(staging, artifact.path, row, plan, task, prepared.loaded.tokenizer, figures, _logged(fp32, figures),
                 name, digest)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads_before)
    return ExportedModel(out, row["trial"], rule.describe(metric), {k: v["value"] for k, v in figures.items()},
                         _logged(row, figures), digest, row.get("hardware") == current_target().key)


LatencyTimer = Callable[[list[Path], dict[str, Any], Config], list[dict[str, float]]]
"""(files, latency feeds, the search's config) -> each file's latency figures, in order."""


def _latencies_in_fresh_process(paths: list[Path], feeds, config: Config) -> list[dict[str, float]]:
    """Time the files one after another in a process of its own: the rebuild's torch thread pools
    (they spin for a while after work) must not share the cores with the timed runs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from slimtune.evaluators.node_lock import default_lock_path
    from slimtune.search.remeasure import isolated_latency

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [pool.submit(isolated_latency, str(p), feeds, config.latency, str(default_lock_path())).result()
                for p in paths]


def machine_drift(now_ms: list[float], then_ms: list[float]) -> float:
    """How much slower (> 1) or faster this machine runs now than during the search: the median
    ratio of other front points' latency timed now to their published figure. 1.0 without any."""
    import statistics

    ratios = [now / then for now, then in zip(now_ms, then_ms, strict=True) if then > 0]
    return statistics.median(ratios) if ratios else 1.0


def _verify(path: Path, row: dict[str, str], task, config: Config, tolerance: float, front: list[dict[str, str]],
            models: Path, timer: LatencyTimer) -> dict[str, dict[str, Any]]:
    """Re-measure the rebuilt file; quality must equal the logged figures, latency be within ``tolerance``
    of the search's, once corrected for how fast this machine runs now (timed on other front points'
    files, ``models``, side by side in the same process)."""
    figures: dict[str, dict[str, Any]] = {}
    for m in measure_quality(path, task, threads=max(1, int(config.search.cpus_per_trial))):
        figures[m.name] = {"value": m.value, "unit": m.unit}
        if row.get(m.name) and abs(m.value - float(row[m.name])) > 1e-6:
            raise ReleaseError(f"the rebuilt {row['trial']} scores {m.name} {m.value:.6f}, the search logged "
                               f"{float(row[m.name]):.6f}: it is not the model that was measured")
    feeds = latency_inputs(task.input_ids, task.attention_mask, config.latency)
    others = [r for r in front if r["trial"] != row["trial"] and (models / f"{r['trial']}.onnx").is_file()][:3]
    timed = timer([path] + [models / f"{r['trial']}.onnx" for r in others], feeds, config)
    for name, value in timed[0].items():
        figures[name] = {"value": value, "unit": "ms" if name.endswith("_ms") else "fraction"}
    figures["size_mb"] = {"value": path.stat().st_size / 1e6, "unit": "MB"}
    drift = machine_drift([t["latency_ms"] for t in timed[1:]], [float(r["latency_ms"]) for r in others])
    figures["machine_drift"] = {"value": drift, "unit": "ratio"}
    ratio = figures["latency_ms"]["value"] / float(row["latency_ms"]) / drift
    if row.get("hardware") == current_target().key and abs(ratio - 1) > tolerance:
        lost = timed[0].get("cpu_contention")
        cause = f"other programs took {lost:.0%} of its CPU time: " if lost is not None and timed[0].get(
            "machine_busy") else "is the machine busy? "
        raise ReleaseError(f"the rebuilt {row['trial']} runs in {figures['latency_ms']['value']:.1f} ms, x{ratio:.2f} "
                           f"of the search's {float(row['latency_ms']):.1f} ms on the same hardware (after this machine's "
                           f"drift of x{drift:.2f}, timed on {len(others)} other front points), beyond the tolerance of "
                           f"{tolerance:.0%}: {cause}retry on a quiet machine, or raise --latency-tolerance")
    return figures


def _logged(row: dict[str, str] | None, keys) -> dict[str, float]:
    """The figures of a ``pareto.csv`` / ``trials.csv`` row among ``keys`` (the ones it has)."""
    return {k: float(row[k]) for k in keys if row and row.get(k)}


def _package(folder: Path, artifact: Path, row: dict[str, str], plan: CompressionPlan, task, tokenizer,
             figures: dict[str, dict[str, Any]], fp32: dict[str, float], name: str, digest: str) -> None:
    """Write the shipped folder; ``fp32``: the search's uncompressed figures, for the model card."""
    shipped = with_probabilities(onnx.load(str(artifact)), task)
    outputs = [o.name for o in shipped.graph.output]
    onnx.save_model(shipped, str(folder / "model.onnx"))
    artifact.unlink()
    tokenizer.save_pretrained(folder)
    (folder / "plan.json").write_text(plan.dumps() + "\n")
    if task.label_names:
        write_json(folder / "labels.json", list(task.label_names))
    target = current_target()
    tokens = {"max_length": int(task.input_ids.shape[1]), "pad_id": int(tokenizer.pad_token_id),
              "pad_token": str(tokenizer.pad_token)}
    write_json(folder / "metrics.json", {
        "search": name, "trial": row["trial"], "task_kind": task.kind, "metric": task.metric,
        "export": figures, "export_hardware": target.as_dict(), "export_hardware_target": target.key,
        "search_figures": _logged(row, figures), "search_hardware_target": row.get("hardware"),
        "fp32_search_figures": fp32, "artifact_sha256": digest, "model_sha256": file_sha256(folder / "model.onnx"),
        "outputs": outputs, "tokenizer": tokens,
    })
    (folder / "README.md").write_text(model_card(name, row["trial"], task, figures, fp32, _plan_summary(plan),
                                                 outputs, tokens))


def register(exported: ExportedModel, search: str, model_name: str, alias: str | None, uri: str,
             experiment: str) -> str:
    """Log the shipped folder as an MLflow pyfunc model in its trial's run (tagged with the search's
    parent run), register it as ``model_name`` and point ``alias`` at the new version; returns
    ``models:/<name>/<version>``. The tracking URI is set for this call only."""
    import sys
    from types import SimpleNamespace

    import cloudpickle
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from slimtune.release import pyfunc

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    parents = client.search_runs([found.experiment_id], f"attributes.run_name = '{search}' and tags.`slimtune.kind` = "
                                 "'search'", order_by=["attributes.start_time DESC"], max_results=1) if found else []
    if not parents:
        raise ReleaseError(f"no MLflow run of search {search!r} in {uri} (experiment {experiment!r}): "
                           "pass the store the search logged to with --tracking-uri")
    parent = parents[0].info.run_id
    trials = client.search_runs([found.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}' and "
                                f"attributes.run_name LIKE '{exported.trial}%'", max_results=1)
    example = pd.DataFrame({"text": ["a first example text", "and a second one"]})
    shipped = pyfunc.ShippedModel()
    shipped.load_context(SimpleNamespace(artifacts={"shipped": str(exported.folder)}))
    signature = infer_signature(example, shipped.predict(None, example))
    previous = mlflow.get_tracking_uri()
    cloudpickle.register_pickle_by_value(sys.modules[pyfunc.__name__])
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=trials[0].info.run_id if trials else parent):
            info = mlflow.pyfunc.log_model(
                name="shipped", python_model=pyfunc.ShippedModel(), artifacts={"shipped": str(exported.folder)},
                signature=signature, input_example=example,
                pip_requirements=["onnxruntime", "tokenizers", "numpy", "pandas", "mlflow"])
        version = mlflow.register_model(info.model_uri, model_name, tags={
            "slimtune.search": search, "slimtune.trial": exported.trial, "slimtune.search_run_id": parent,
            "slimtune.artifact_sha256": exported.artifact_sha256})
        if alias:
            client.set_registered_model_alias(model_name, alias, version.version)
    finally:
        mlflow.set_tracking_uri(previous)
        cloudpickle.unregister_pickle_by_value(sys.modules[pyfunc.__name__])
    return f"models:/{model_name}/{version.version}"


__all__ = ["ChoiceError", "ExportedModel", "ReleaseError", "Rule", "export_search", "register"]
