"""The two jobs the CLI runs, wired from the rooms below: a search (``SearchSession``), and the baselines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console, RenderableType

from slimtune.config import Config, ConfigError
from slimtune.layout import LayoutError
from slimtune.model import ModelLoadError
from slimtune.phases import phases_on
from slimtune.plan import PlanError
from slimtune.prepare import prepare
from slimtune.search.records import TrialRecord
from slimtune.search.runner import ClusterError
from slimtune.search.session import ResumeError
from slimtune.tasks import DataError
from slimtune.tracking import TrackingError

if TYPE_CHECKING:  # the session imports Ray: only when a search runs
    from slimtune.search_session import Published, SearchSession

BAD_INPUT = (ConfigError, ModelLoadError, LayoutError, DataError, PlanError, TrackingError, ClusterError, ResumeError)


def run_search_job(config: Config, name: str, out: Path, results: Path, console: Console,
                   resume: bool = False) -> tuple[list[TrialRecord], set[int]]:
    """Run one search end to end, or (``resume``) continue one whose driver died; print its front
    and where to review it; returns the records and the Pareto trial numbers."""
    from slimtune.search_session import SearchSession

    session = (SearchSession.resume if resume else SearchSession.start)(config, name, out, results, console)
    try:
        published = session.publish(session.run())
    except BaseException as exc:
        session.abort(exc)
        raise
    finally:
        session.close()
    for line in published_lines(session, published):
        console.print(line, soft_wrap=True)
    return published.records, published.pareto


def published_lines(session: SearchSession, published: Published) -> list[RenderableType]:
    """What a finished search says: its front as a table, the kernel modes, any busy-machine warning,
    and where its results and review are."""
    from rich.text import Text

    from slimtune.report import busy_lines, kernel_modes_lines, pareto_table
    from slimtune.search.pareto import hardware_targets
    from slimtune.tracking import review_links

    records, pareto, metric, config = published.records, published.pareto, session.prepared.task.metric, session.config
    lines: list[RenderableType] = []
    targets = hardware_targets(records)
    if len(targets) > 1:
        lines.append(f"front computed per hardware target ({len(targets)}: {'; '.join(targets)}): latencies of "
                     "different hardware are not compared")
    lines.append(pareto_table(records, pareto, metric,
                              title=f"Pareto front of {session.name} ({len(pareto)} of {len(records)} trials)"))
    lines += kernel_modes_lines(records, metric)
    lines += [Text(line, style="bold red") for line in busy_lines(records, pareto)]
    uri = session.tracker.uri
    lines.append(f"results: {session.out}/ (pareto.csv, pareto.html, pareto.png, plans/, models/)")
    lines.append(f"MLflow:  slimtune ui{'' if not config.tracking.uri else ' --tracking-uri ' + uri}   "
                 f"(store {uri}, experiment {config.tracking.experiment!r}, run {session.name!r})")
    links = review_links(uri, session.tracker.experiment_id, session.tracker.parent_id)
    lines += [f"review:  {links['trials']}", f"front:   {links['front']}"]
    return lines


def run_baseline_job(config: Config, out: Path, results: Path, console: Console) -> list[dict[str, float | str]]:
    """fp32, uniform int8 (per-channel) and uniform 4-bit, measured side by side in one run."""
    import csv

    from slimtune.config import SpaceConfig
    from slimtune.evaluators.latency import latency_inputs
    from slimtune.evaluators.node_lock import NodeLock
    from slimtune.report import figures_table
    from slimtune.search.measure import PlanInputs, measure_plan
    from slimtune.spaces import SearchSpace
    from slimtune.transforms import Calibration

    prepared = prepare(config, results, phases_on(console))
    for line in prepared.findings():
        console.print(line)
    block = config.space.block_sizes[0]
    space = SearchSpace(prepared.layout, SpaceConfig(weight_formats=("fp32", "int8", "int4"), ffn_sparsities=(0.0,),
                                                    head_fractions=(0.0,), depth_fractions=(0.0,), rank_fractions=(1.0,),
                                                    embedding_formats=("fp32", "int8"), block_sizes=(block,),
                                                    int4_methods=("rtn",)))
    inputs = PlanInputs(model=prepared.loaded.module, task=prepared.task, calibration=Calibration(),
                        feeds=latency_inputs(prepared.task.input_ids, prepared.task.attention_mask, config.latency))
    variants = {"fp32": (32, 32), "uniform int8 (per-channel)": (8, 8),
                f"uniform int4 (block {block}, int8 embedding)": (4, 8)}
    rows: list[dict[str, float | str]] = []
    work = results / f".partial-{out.name}"
    work.mkdir(parents=True, exist_ok=True)
    for label, (bits, embedding_bits) in variants.items():
        with console.status(f"building and measuring {label}"):
            choices = {dim: bits if dim.endswith(".bits") else options[0] for dim, options in space.dimensions().items()}
            choices["embeddings.bits"] = embedding_bits
            measured = measure_plan(inputs, space.plan_from_choices(choices), work / f"{bits}.onnx", config.latency,
                                    config.latency.threads, NodeLock())
        rows.append({"variant": label, **{k: round(v, 6) if isinstance(v, float) else v for k, v in measured.items()
                                          if k != "artifact"}})
    with (work / "baseline.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for onnx_file in work.glob("*.onnx"):
        onnx_file.unlink()
    work.rename(out)
    console.print(figures_table(f"Baselines ({config.latency.batch_size}x{config.latency.sequence_length} tokens, "
                                f"{config.latency.threads} threads)", "variant",
                                [(str(row["variant"]), row) for row in rows], prepared.task.metric))
    console.print(f"results: {out}/baseline.csv")
    return rows
