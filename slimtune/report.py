"""What a search leaves in ``results/<name>/``: the front as CSV, plots, plans and a table.

pareto.csv   one row per Pareto-optimal trial: the task's metrics (accuracy, macro_f1 or
             top10_overlap, embedding_cosine), latency_ms, size_mb, ...
trials.csv   every trial, failed and stopped ones included, with status and error
pareto.html  interactive plot (latency vs the searched metric, marker area ~ size, hover shows the plan;
             ms or x fp32)
pareto.png   the front against latency and size, references in the legend, arrows to recovered points
plans/       the CompressionPlan JSON of every Pareto-optimal trial
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from slimtune.config import METRIC_GOALS, QUALITY_METRICS
from slimtune.export.modes import KernelModes
from slimtune.search.records import TrialRecord
from slimtune.spaces import SearchSpace

SPEED_AND_SIZE = ("latency_ms", "latency_p90_ms", "latency_spread", "size_mb", "search_latency_ms")
GENERATION = ("ttft_ms", "tokens_per_s")  # causal LMs: latency_ms is then the time per generated token


def speed_names(metrics: list[dict[str, Any]]) -> tuple[str, ...]:
    """Latency and size columns, with the generation figures where the trials measured them."""
    return SPEED_AND_SIZE + tuple(name for name in GENERATION if any(name in m for m in metrics))


def quality_names(metrics: list[dict[str, Any]], metric: str) -> tuple[str, ...]:
    """The quality metrics the trials measured, the searched ``metric`` first."""
    measured = [name for name in QUALITY_METRICS if name != metric and any(name in m for m in metrics)]
    return (metric, *measured)


def _row(record: TrialRecord, pareto: set[int], not_faster: set[int], figures: tuple[str, ...]) -> dict[str, object]:
    row: dict[str, object] = {"trial": record.name, "reference": record.reference,
                              "recovered_from": "" if record.recovered_from is None else f"trial-{record.recovered_from:03d}",
                              "status": record.status, "pareto": record.number in pareto,
                              "not_faster": record.number in not_faster}
    row.update({k: (round(float(record.metrics[k]), 6) if k in record.metrics else "") for k in figures})
    row["quality_texts"] = record.metrics.get("quality_texts", "")  # fewer than all: screened by staged scoring
    # 1: the uncompressed model's figures, the export having computed the same on the sample
    row["quality_by_uncompressed"] = record.metrics.get("quality_by_uncompressed", "")
    row["latency_runs"] = record.metrics.get("latency_runs", "")  # fewer than timed_runs: the median was known
    row["hardware"] = record.metrics.get("hardware", "")
    row["node"] = record.metrics.get("node", "")
    row["plan_digest"] = record.metrics.get("plan_digest", "")
    row["artifact_sha256"] = record.metrics.get("artifact_sha256", "")
    row["kernels"] = record.metrics.get("kernels", "")
    row["exporter"] = record.metrics.get("exporter", "")
    row["kernel_modes"] = record.metrics.get("kernel_modes", "")
    row["build_threads"] = record.metrics.get("build_threads", "")  # a rebuild reads them back
    row["cpu_contention"] = round(float(record.metrics["cpu_contention"]), 4) if "cpu_contention" in record.metrics else ""
    row["machine_busy"] = int(bool(record.metrics["machine_busy"])) if "machine_busy" in record.metrics else ""
    row["error"] = record.error
    row.update(record.params)
    return row


def _write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or ["trial"])
        writer.writeheader()
        writer.writerows(rows)


def front(records: list[TrialRecord], pareto: set[int], metric: str) -> list[TrialRecord]:
    """Pareto-optimal trials, best in ``metric`` first (then fastest)."""
    sign = -1.0 if METRIC_GOALS[metric] == "max" else 1.0
    return sorted((r for r in records if r.number in pareto),
                  key=lambda r: (sign * r.metrics[metric], r.metrics["latency_ms"]))


def write_results(out: Path, records: list[TrialRecord], pareto: set[int], space: SearchSpace,
                  config_yaml: str, metric: str, not_faster: set[int] = frozenset()) -> None:
    """``metric``: the searched one (first column, plots' y axis). ``not_faster``: trials compressed
    but not faster than fp32 (column ``not_faster``, crossed in plots)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans").mkdir(exist_ok=True)
    best = front(records, pareto, metric)
    figures = quality_names([r.metrics for r in records], metric) + speed_names([r.metrics for r in records])
    _write_csv(out / "pareto.csv", [_row(r, pareto, not_faster, figures) for r in best])
    _write_csv(out / "trials.csv", [_row(r, pareto, not_faster, figures) for r in records])
    for record in best:
        plan = space.plan_from_choices(record.params)
        (out / "plans" / f"{record.name}.json").write_text(plan.dumps() + "\n")
    (out / "search_config.yaml").write_text(config_yaml)
    modes = kernel_modes_by_target(records)
    if modes:
        (out / "kernel_modes.json").write_text(json.dumps(modes, indent=1, sort_keys=True) + "\n")
    completed = [r for r in records if r.status == "completed"]
    if completed:
        write_plots(out, completed, pareto, metric, not_faster)


def write_plots(out: Path, completed: list[TrialRecord], pareto: set[int], metric: str,
                not_faster: set[int] = frozenset()) -> None:
    from slimtune.plots import write_html, write_png

    write_html(out / "pareto.html", completed, pareto, metric, not_faster)
    write_png(out / "pareto.png", completed, pareto, metric, not_faster)


_QUANTIZED_KERNELS = ("MatMulInteger", "MatMulNBits")


def busy_lines(records: list[TrialRecord], pareto: set[int]) -> list[str]:
    """The warning for trials whose latency was timed while other programs took the CPU (empty
    when every timing was quiet): how many, how much, and whether front points are among them."""
    busy = [r for r in records if r.status == "completed" and r.metrics.get("machine_busy")]
    if not busy:
        return []
    worst = max(float(r.metrics.get("cpu_contention", 0.0)) for r in busy)
    on_front = [r.name for r in busy if r.number in pareto]
    return [f"WARNING: the machine was busy: {len(busy)} of {sum(r.status == 'completed' for r in records)} trials "
            f"were timed while other programs took up to {worst:.0%} of the CPU (machine_busy in trials.csv, tag "
            f"slimtune.machine_busy in MLflow); their latencies read high"
            + (f", front points among them: {', '.join(on_front)}" if on_front else "")
            + ". Re-run on a quiet machine before trusting them."]


def kernel_modes_by_target(records: list[TrialRecord]) -> dict[str, dict[str, Any]]:
    """Per hardware target: the kernel modes its trials were built with (``modes``, ``described``) and
    every candidate mode's measured figures (metric on the sample, latency in ms)."""
    found: dict[str, dict[str, Any]] = {}
    # a trial without blockwise weights was built without the modes (they change nothing there):
    # the measured ones are read from a trial that has them
    measured_first = sorted(records, key=lambda r: json.loads(r.metrics.get("kernel_mode_figures") or "[]") == [])
    for record in measured_first:
        hardware, modes = record.metrics.get("hardware"), record.metrics.get("kernel_modes")
        if hardware and modes and hardware not in found:
            found[hardware] = {"modes": json.loads(modes), "described": KernelModes.loads(modes).describe(),
                               "figures": json.loads(record.metrics.get("kernel_mode_figures") or "[]")}
    return found


def _mode_text(figure: dict[str, Any], metric: str) -> str:
    """One candidate mode's figures: its latency, and its metric when the choice needed it scored."""
    name = f"{figure['bits']}-bit level {figure['level']}{' sym' if figure['symmetric'] else ''}"
    if figure["error"]:
        return f"{name} refused"
    scored = f"{metric} {figure['metric']:.4g}" if figure["metric"] is not None else "not scored (not needed)"
    return f"{name} {figure['latency_ms']:.2f} ms {scored}"


def kernel_modes_line(hardware: str, described: str, figures: list[dict[str, Any]], metric: str) -> str:
    """One hardware target's chosen modes (``described``) and what each candidate measured."""
    measured = "; ".join(_mode_text(f, metric) for f in figures)
    return f"kernel modes on {hardware}: {described}" + (f" (measured: {measured})" if measured else "")


def kernel_modes_lines(records: list[TrialRecord], metric: str) -> list[str]:
    """One console line per hardware target: the chosen modes and what each candidate measured."""
    return [kernel_modes_line(hardware, found["described"], found["figures"], metric)
            for hardware, found in kernel_modes_by_target(records).items()]


def kernel_summary(kernels_json: str) -> str:
    """'MatMulInteger 16, MatMulNBits 20' from the trial's op counts; '-' when nothing is quantized."""

    counts = json.loads(kernels_json) if kernels_json else {}
    return ", ".join(f"{k} {counts[k]}" for k in _QUANTIZED_KERNELS if counts.get(k)) or "-"


def figures_table(title: str, first_column: str, rows: list[tuple[str, dict[str, Any]]], metric: str) -> Table:
    """One row per measured artifact: the task's metrics (``metric`` first), latency median (p90),
    size and quantized kernels."""
    quality = quality_names([m for _, m in rows], metric)
    generation = all("ttft_ms" in m for _, m in rows) and bool(rows)
    latency = ("ms per token (p90)", "TTFT ms") if generation else ("latency ms (p90)",)
    table = Table(title=title)
    for column in (first_column, *quality, *latency, "size MB", "quantized kernels"):
        table.add_column(column, justify="left" if column in (first_column, "quantized kernels") else "right",
                         overflow="fold")
    for label, m in rows:
        timing = [f"{m['latency_ms']:.1f} ({m['latency_p90_ms']:.1f})"] + ([f"{m['ttft_ms']:.1f}"] if generation else [])
        table.add_row(label, *(f"{m[name]:.4f}" for name in quality), *timing,
                      f"{m['size_mb']:.2f}", kernel_summary(m.get("kernels", "")))
    return table


def pareto_table(records: list[TrialRecord], pareto: set[int], metric: str, title: str = "Pareto front") -> Table:
    return figures_table(title, "trial", [(r.label, r.metrics) for r in front(records, pareto, metric)], metric)
