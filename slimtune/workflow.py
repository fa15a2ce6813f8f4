"""The two jobs the CLI runs, wired from the rooms below: a search, and the baselines.

search: config -> model + task -> space -> Ray Tune / Optuna trials (transforms, export,
evaluators) -> Pareto front -> MLflow + results/<name>/. Results are assembled in a hidden
folder and renamed into place at the end, so an interrupted search leaves no half-written
results/<name>/.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from slimtune.config import BUILTIN_LLM, Config, ConfigError, config_to_yaml
from slimtune.layout import LayoutError, ModelLayout, discover_layout
from slimtune.model import LoadedModel, ModelLoadError, load_model, resolve_model_source
from slimtune.plan import PlanError
from slimtune.search.records import TrialRecord
from slimtune.search.runner import ClusterError
from slimtune.search.session import ResumeError
from slimtune.tasks import DataError, PreparedTask, choose_task, default_data, load_texts, prepare_task
from slimtune.tracking import TrackingError

BAD_INPUT = (ConfigError, ModelLoadError, LayoutError, DataError, PlanError, TrackingError, ClusterError, ResumeError)


@dataclass(frozen=True)
class Prepared:
    """``config`` is resolved: ``task.kind``, ``task.metric`` and (embedding kinds) ``model.pooling``
    hold what was detected, so the logged config reproduces the search."""

    config: Config
    loaded: LoadedModel
    layout: ModelLayout
    task: PreparedTask
    task_path: Path


def prepare(config: Config, results: Path, console: Console) -> Prepared:
    """Read the data, choose the task kind, load the model, and prepare (or reuse) the scored task."""
    from slimtune.phases import Phase

    with Phase(console, f"finding {config.model.name}"):
        source = resolve_model_source(config.model.name)  # a GGUF is dequantized once here
    data_source = default_data(config.task, source)
    data = load_texts(config.task, data_source)
    choice = choose_task(config.model, config.task, source, data)
    with Phase(console, f"loading {config.model.name}"):
        loaded = load_model(config.model.name, classification_head=choice.needs_classification_head,
                            causal_lm=choice.needs_causal_lm)
        layout = discover_layout(loaded.module)
    with Phase(console, "running the uncompressed model over the texts (once, then cached)") as phase:
        task, task_path = prepare_task(config.model, config.task, choice, loaded, data, results / ".cache",
                                       progress=lambda done, total: phase.update(done, total))
    if config.model.name.endswith(".gguf") or config.model.name == BUILTIN_LLM:
        console.print(f"model: {config.model.name} is a quantized GGUF file; its \"uncompressed\" fp32 reference is "
                      "the dequantized GGUF, not the original full-precision weights")
    console.print(f"task: {task.kind} ({choice.kind_reason}); output: {choice.output_reason}")
    console.print(f"metric: {task.metric} ({task.metric_reason})")
    figures = ", ".join(f"{k} {v:.4f}" for k, v in task.reference.items())
    if task.kind == "causal-lm":
        held_out = (f"{len(task.input_ids)} held-out windows of {task.input_ids.shape[1]} tokens "
                    f"({int((task.labels >= 0).sum())} scored), {task.train_size} training windows")
    else:
        labels = f", {len(set(task.labels.tolist()))} labels" if task.labels is not None else ""
        held_out = f"{len(task.input_ids)} held-out texts{labels}, {task.train_size} training texts"
    console.print(f"data: {held_out}; uncompressed torch model: {figures}")
    pooling = task.output.pooling if task.output.kind == "embedding" else config.model.pooling
    resolved = config.model_copy(update={
        "task": config.task.model_copy(update={"kind": task.kind, "metric": task.metric, "data": data_source}),
        "model": config.model.model_copy(update={"pooling": pooling}),
    })
    return Prepared(resolved, loaded, layout, task, task_path)


def _summary(records: list[TrialRecord], pareto: set[int], task: PreparedTask,
             quality_floor: float) -> dict[str, float]:
    """Counts, the best figure of each objective, and the uncompressed model's figures (``reference_*``)."""
    from slimtune.config import METRIC_GOALS
    from slimtune.search.front_progress import hypervolume
    from slimtune.search.objectives import objectives

    done = [r for r in records if r.status == "completed"]
    summary = {f"trials_{s}": float(sum(r.status == s for r in records)) for s in ("completed", "failed", "stopped")}
    summary["pareto_size"] = float(len(pareto))
    summary.update({f"reference_{name}": value for name, value in task.reference.items()})
    summary["hardware_targets"] = float(len({r.metrics.get("hardware") for r in done}))
    summary["final_hypervolume"] = hypervolume(records, objectives(task.metric), quality_floor)  # recovered points included
    if done:
        best = max if METRIC_GOALS[task.metric] == "max" else min
        summary[f"best_{task.metric}"] = best(float(r.metrics[task.metric]) for r in done)
        summary["best_latency_ms"] = min(float(r.metrics["latency_ms"]) for r in done)
        summary["best_size_mb"] = min(float(r.metrics["size_mb"]) for r in done)
    return summary


def _keep_front_artifacts(records: list[TrialRecord], pareto: set[int], models_dir: Path) -> None:
    """Bring the front's ONNX files to ``models_dir``: copied when this machine holds the file (an
    artifact's name is the digest of everything it was built from), else fetched through Ray from
    the node that built it."""
    import ray

    from slimtune.search.shipping import on_node, read_bytes

    models_dir.mkdir(parents=True, exist_ok=True)
    for record in records:
        artifact, node = record.metrics.get("artifact"), record.metrics.get("node")
        if record.number not in pareto or not artifact:
            continue
        if Path(artifact).is_file():
            shutil.copy2(artifact, models_dir / f"{record.name}.onnx")
        elif ray.is_initialized() and node:
            (models_dir / f"{record.name}.onnx").write_bytes(on_node(node, read_bytes, artifact))


def sensitivity_guidance(prepared: Prepared, space, calibration, results: Path, console: Console):
    """The sensitivity profile of ``space`` (measured once, cached with the task), and what it changes:
    options below ``search.quality_floor`` not offered, seed plans along its greedy path."""
    from slimtune.phases import Phase
    from slimtune.search.sensitivity import PROFILE_TEXTS, cached_profile, guide, measure_profile, profile_key

    config = prepared.config
    key = profile_key(prepared.loaded.source, prepared.task_path, space, PROFILE_TEXTS, config.task.seed)
    with Phase(console, "sensitivity: each choice alone, once (then cached)") as phase:
        profile, cached = cached_profile(results / ".cache", key, lambda: measure_profile(
            prepared.loaded.module, space, prepared.task, calibration, PROFILE_TEXTS, config.task.seed,
            lambda done, total: phase.update(done, total, "choices measured")))
    guidance = guide(space, profile, config.search.quality_floor, config.search.seed_plans)
    removed = "; ".join(f"{dim} {list(options)}" for dim, options in guidance.excluded) or "none"
    console.print(f"sensitivity: {len(profile.effects)} choices on {profile.texts} texts "
                  f"({'cached' if cached else f'{profile.seconds:.0f} s'}); below {config.search.quality_floor:.0%} "
                  f"of the uncompressed {profile.metric_name} alone, not offered: {removed}; "
                  f"{len(guidance.seeds)} seed plans")
    return guidance


def _recover_front(records: list[TrialRecord], ctx, tracker, console: Console) -> list[TrialRecord]:
    """Distill the front's shape-changing points (recovery mode 'front'), with a progress bar."""
    from slimtune.phases import Phase
    from slimtune.search.objectives import objectives
    from slimtune.search.pareto import pareto_numbers
    from slimtune.search.recovery import recover_front
    from slimtune.transforms.distill import reporting_steps

    recovery_ctx = dataclasses.replace(ctx, config=ctx.config.model_copy(update={"search": ctx.config.search.model_copy(
        update={"cpus_per_trial": float(os.cpu_count() or 1)})}))  # nothing else runs now: every core
    points = {"done": 0, "total": 0}

    def point_done(done: int, total: int) -> None:
        points.update(done=done, total=total)
        phase.update(done, total, "front points distilled")

    def step(done: int, steps: int, loss: float, seconds_left: float) -> None:
        phase.update(points["done"], points["total"] or None, f"point {points['done'] + 1}: step {done}/{steps}, "
                     f"loss {loss:.4g}, about {seconds_left:.0f} s left")

    with Phase(console, f"distillation recovery of front points (up to {ctx.config.recovery.steps} steps each)") \
            as phase, reporting_steps(step):
        added = recover_front(records, pareto_numbers(records, objectives(ctx.config.task.metric)), recovery_ctx,
                              listeners=(tracker,), progress=point_done)
    done = [r for r in added if r.status == "completed"]
    seconds = ", ".join(f"{r.metrics['recover_s']:.0f}" for r in done)
    console.print(f"recovery: {len(done)} of {len(added)} front points distilled and re-measured"
                  + (f" ({seconds} s each)" if done else ""))
    return added


def _remeasure_front(records: list[TrialRecord], goals, task: PreparedTask, config: Config, tracker,
                     console: Console) -> tuple[list[TrialRecord], set[int]]:
    """Time the front's artifacts again, one at a time, nothing else running, each on the node that
    built it; publish that front."""
    import statistics

    import ray

    from slimtune.evaluators.latency import latency_inputs
    from slimtune.evaluators.node_lock import default_lock_path
    from slimtune.phases import Phase
    from slimtune.search.remeasure import isolated_latency, remeasure_front
    from slimtune.search.shipping import on_node

    feeds = latency_inputs(task.input_ids, task.attention_mask, config.latency)
    lock = str(default_lock_path())

    def retime(record: TrialRecord) -> dict[str, float]:
        node, artifact = record.metrics.get("node"), record.metrics["artifact"]
        if ray.is_initialized() and node:
            return on_node(node, isolated_latency, artifact, feeds, config.latency, lock)
        return isolated_latency(artifact, feeds, config.latency, lock)

    with Phase(console, "re-measuring the front's latency in isolation") as phase:
        records, pareto = remeasure_front(records, goals, retime, tracker.trial_remeasured,
                                          progress=lambda done: phase.update(done, detail="points timed"))
    changes = [r.metrics["latency_ms"] / r.metrics["search_latency_ms"] for r in records if r.metrics.get("remeasured")]
    if changes:
        console.print(f"front re-measured in isolation: {len(changes)} points, latency x{statistics.median(changes):.2f} "
                      f"of the search-time figure (median; range {min(changes):.2f}-{max(changes):.2f})")
    return records, pareto


def _tracking_params(config: Config, task: PreparedTask, out: Path) -> dict:
    return {"model": config.model.name, "data": config.task.data, "task_kind": task.kind, "metric": task.metric,
            "output": task.output.name, **({"pooling": task.output.pooling} if task.output.kind == "embedding" else {}),
            "trials": config.search.trials, "workers": config.search.workers, "seed": config.search.seed,
            "sampler": config.search.sampler, "time_budget_s": config.search.time_budget_s, "results_dir": str(out)}


def _take_over(work: Path, console: Console):
    """Before a resumed search starts Ray: its saved state, with what the dead driver left running ended."""
    from slimtune.search.session import ResumeError, SearchState, driver_running, end_session

    state = SearchState.load(work)
    if state.driver_pid != os.getpid() and driver_running(state.driver_pid):
        raise ResumeError(f"search {state.name!r} is still running (driver pid {state.driver_pid}): "
                          "stop it first or let it finish")
    ended = end_session(state.ray_session)
    console.print(f"resuming {state.name}: the dead driver's Ray session left {len(ended)} processes, ended")
    return state


def run_search_job(config: Config, name: str, out: Path, results: Path, console: Console,
                   resume: bool = False) -> tuple[list[TrialRecord], set[int]]:
    """Run one search end to end, or (``resume``) continue one whose driver died; returns the records
    and the Pareto trial numbers."""
    import time

    import ray

    from slimtune.evaluators.node_lock import default_lock_path
    from slimtune.phases import Phase
    from slimtune.report import busy_lines, kernel_modes_lines, pareto_table, write_results
    from slimtune.search.front_progress import FrontProgress
    from slimtune.search.objectives import objectives
    from slimtune.search.pareto import hardware_targets, not_faster_numbers
    from slimtune.search.progress import ProgressDisplay
    from slimtune.search.runner import Continuation, check_cluster, run_search, start_ray
    from slimtune.search.session import (
        JOURNAL_FILE,
        SearchState,
        TrialJournal,
        fail_unfinished_study_trials,
        local_ray_session,
        study_uri,
    )
    from slimtune.search.shipping import alive_nodes, node_work_dir, on_node, remove_tree, ship
    from slimtune.search.trial import TrialContext, make_space, task_calibration
    from slimtune.tracking import MlflowSearchRun, check_reachable, default_tracking_uri, review_links

    work = results / ".work" / name
    state = _take_over(work, console) if resume else None
    uri = state.tracking_uri if state else config.tracking.uri or default_tracking_uri(results)
    check_reachable(uri)  # both before minutes of preparation
    check_cluster(config.search.address)
    prepared = prepare(config, results, console)
    config, task = prepared.config, prepared.task
    with Phase(console, "measuring block and head importance on calibration texts"):
        calibration = task_calibration(prepared.loaded.module, task)
        space = make_space(config, prepared.loaded.module, calibration)
    guidance = sensitivity_guidance(prepared, space, calibration, results, console) if config.search.sensitivity \
        else None
    space = guidance.space if guidance else space
    console.print(f"space: {len(prepared.layout.blocks)} blocks in {len(space.groups)} groups, "
                  f"{sum(len(v) > 1 for v in space.dimensions().values())} open dimensions; "
                  f"references: {', '.join(space.reference_points()) or 'none in this space'}")
    start_ray(config.search.address)
    tracker = None
    try:
        earlier: list[TrialRecord] = []
        if state is None:
            tracker = MlflowSearchRun(uri, config.tracking.experiment, name, space, _tracking_params(config, task, out),
                                      artifact_root=None if config.tracking.uri else results / "mlartifacts")
            tracker.client.log_text(tracker.parent_id, config_to_yaml(config), "search_config.yaml")
            state = SearchState(name, str(out), config_to_yaml(config), uri, tracker.parent_id, os.getpid(),
                                local_ray_session(), time.time())
            continuation = Continuation(study_uri(work), name)
            shutil.rmtree(work, ignore_errors=True)  # an earlier, failed search of this name: never reuse its leftovers
        else:
            tracker = MlflowSearchRun.attach(uri, state.parent_run_id, space)
            earlier = TrialJournal.load(work)
            first_number = tracker.adopt(earlier)
            abandoned = fail_unfinished_study_trials(work, name)
            journal = work / JOURNAL_FILE
            spent = (journal.stat().st_mtime if journal.is_file() else state.started_at) - state.started_at
            budget = config.search.time_budget_s
            continuation = Continuation(study_uri(work), name, True, first_number,
                                        trials_left=max(0, config.search.trials - len(earlier)),
                                        time_left_s=max(1.0, budget - spent) if budget else None)
            console.print(f"resume: {len(earlier)} finished trials kept, {abandoned} unfinished closed; "
                          f"{continuation.trials_left} trials left")
            state = dataclasses.replace(state, driver_pid=os.getpid(), ray_session=local_ray_session())
        state.save(work)
        search_id = f"{name}-{int(state.started_at)}"
        ctx = TrialContext(config=config, model_source=prepared.loaded.source,
                           task_path=str(prepared.task_path.resolve()), work_dir=str(work.resolve()),
                           lock_path=str(default_lock_path()),
                           shipment=ship(search_id, prepared.loaded.source, prepared.task_path),
                           excluded=guidance.excluded if guidance else (),
                           calibration=dataclasses.replace(calibration, training_ids=None, training_mask=None,
                                                           training_targets=None))
        goals = objectives(task.metric)
        front = FrontProgress(goals, config.search.patience,
                              on_change=lambda value, step: tracker.log_search_metric("hypervolume", value, step),
                              quality_floor=config.search.quality_floor)
        front.records = list(earlier)
        left = continuation.trials_left if continuation.trials_left is not None else config.search.trials
        with ProgressDisplay(left, goals[0], console, front, continuation.time_left_s or config.search.time_budget_s) \
                as progress:
            records = earlier + (run_search(config, ctx, space, work / "ray", name,
                                            listeners=(TrialJournal(work), progress, tracker), front=front,
                                            continuation=continuation, seeds=guidance.seeds if guidance else None)
                                 if left > 0 else [])
        if front.should_stop:
            console.print(f"stopped: no hypervolume gain in the last {config.search.patience} trials "
                          f"(hypervolume {front.hypervolume:.4f})")
        if config.recovery.mode == "front":
            records += _recover_front(records, ctx, tracker, console)
        records, pareto = _remeasure_front(records, goals, task, config, tracker, console)
        partial = results / f".partial-{name}"
        shutil.rmtree(partial, ignore_errors=True)
        write_results(partial, records, pareto, space, config_to_yaml(config), task.metric, not_faster_numbers(records))
        _keep_front_artifacts(records, pareto, partial / "models")
        partial.rename(out)
        tracker.finish(records, pareto, out, _summary(records, pareto, task, config.search.quality_floor), not_faster_numbers(records), task.metric)
        shutil.rmtree(work, ignore_errors=True)  # finished: nothing left to resume
        for node in alive_nodes():  # and every node's trial files
            on_node(node, remove_tree, str(node_work_dir(search_id)))
    except BaseException as exc:
        if tracker is not None:  # interrupted or broken before the end: the parent run must not stay RUNNING
            tracker.abort("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if ray.is_initialized() and not config.search.address:
            ray.shutdown()
    targets = hardware_targets(records)
    if len(targets) > 1:
        console.print(f"front computed per hardware target ({len(targets)}: {'; '.join(targets)}): latencies of "
                      "different hardware are not compared")
    console.print(pareto_table(records, pareto, task.metric,
                               title=f"Pareto front of {name} ({len(pareto)} of {len(records)} trials)"))
    for line in kernel_modes_lines(records, task.metric):
        console.print(line, soft_wrap=True)
    for line in busy_lines(records, pareto):
        console.print(line, style="bold red", soft_wrap=True, markup=False)
    console.print(f"results: {out}/ (pareto.csv, pareto.html, pareto.png, plans/, models/)")
    console.print(f"MLflow:  slimtune ui{'' if not config.tracking.uri else ' --tracking-uri ' + uri}   "
                  f"(store {uri}, experiment {config.tracking.experiment!r}, run {name!r})")
    links = review_links(uri, tracker.experiment_id, tracker.parent_id)
    console.print(f"review:  {links['trials']}", soft_wrap=True)
    console.print(f"front:   {links['front']}", soft_wrap=True)
    return records, pareto


def run_baseline_job(config: Config, out: Path, results: Path, console: Console) -> list[dict[str, float | str]]:
    """fp32, uniform int8 (per-channel) and uniform 4-bit, measured side by side in one run."""
    import csv

    from slimtune.config import SpaceConfig
    from slimtune.evaluators.latency import latency_inputs
    from slimtune.evaluators.node_lock import NodeLock
    from slimtune.report import figures_table
    from slimtune.search.trial import WorkerState, measure_plan
    from slimtune.spaces import SearchSpace
    from slimtune.transforms import Calibration

    prepared = prepare(config, results, console)
    block = config.space.block_sizes[0]
    space = SearchSpace(prepared.layout, SpaceConfig(weight_formats=("fp32", "int8", "int4"), ffn_sparsities=(0.0,),
                                                    head_fractions=(0.0,), depth_fractions=(0.0,), rank_fractions=(1.0,),
                                                    embedding_formats=("fp32", "int8"), block_sizes=(block,),
                                                    int4_methods=("rtn",)))
    state = WorkerState(model=prepared.loaded.module, space=space, task=prepared.task, calibration=Calibration(),
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
            measured = measure_plan(state, space.plan_from_choices(choices), work / f"{bits}.onnx", config.latency,
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
