"""One search as a value: ``start`` a new one or ``resume`` one whose driver died, ``run`` its trials
and front steps, ``publish`` the results; ``abort`` and ``close`` whatever happens.

search: config -> model + task -> space -> Ray Tune / Optuna trials (transforms, export,
evaluators) -> Pareto front -> MLflow + results/<name>/. Results are assembled in a hidden folder
and renamed into place at the end, so an interrupted search leaves no half-written results/<name>/.
A session owns the Ray runtime it started (a local one is shut down by ``close``), the search's
work folder (removed once published) and the MLflow parent run (closed by ``publish``, or ended
FAILED / KILLED by ``abort``).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from rich.console import Console

from slimtune.config import Config, config_to_yaml
from slimtune.evaluators.hardware import current_target
from slimtune.evaluators.node_lock import default_lock_path
from slimtune.files import staged_folder
from slimtune.front_phases import keep_front_artifacts, recover_front_points, remeasure_front_points
from slimtune.phases import Phase, phases_on
from slimtune.prepare import MachineModes, Prepared, machine_kernel_modes, prepare, sensitivity_guidance
from slimtune.report import kernel_modes_line, write_results
from slimtune.search.front_progress import FrontProgress, hypervolume
from slimtune.search.objectives import objectives
from slimtune.search.pareto import not_faster_numbers
from slimtune.search.progress import ProgressDisplay
from slimtune.search.records import TrialRecord
from slimtune.search.runner import Continuation, check_cluster, run_search, start_ray
from slimtune.search.session import (
    JOURNAL_FILE,
    ResumeError,
    SearchState,
    TrialJournal,
    driver_running,
    end_session,
    fail_unfinished_study_trials,
    local_ray_session,
    study_uri,
)
from slimtune.search.shipping import alive_nodes, node_work_dir, on_node, remove_tree, ship
from slimtune.search.trial import TrialContext, make_space, task_calibration
from slimtune.spaces import SearchSpace
from slimtune.tasks import PreparedTask
from slimtune.tracking import MlflowSearchRun, check_reachable, default_tracking_uri


@dataclass(frozen=True)
class Published:
    """A finished search: every trial's record and the numbers of the front's trials."""

    records: list[TrialRecord]
    pareto: set[int]


@dataclass(frozen=True)
class SearchSession:
    """What one search holds between its steps (the MLflow run and Ray live on behind it).
    ``earlier``: the trials a resumed search keeps."""

    name: str
    out: Path
    results: Path
    prepared: Prepared
    space: SearchSpace
    seeds: dict[str, dict[str, Any]] | None  # the sensitivity profile's seed plans (params by name)
    tracker: MlflowSearchRun
    ctx: TrialContext
    continuation: Continuation
    console: Console
    earlier: list[TrialRecord] = field(default_factory=list)

    @property
    def config(self) -> Config:
        return self.prepared.config

    @property
    def work(self) -> Path:
        return self.results / ".work" / self.name

    @classmethod
    def start(cls, config: Config, name: str, out: Path, results: Path, console: Console) -> SearchSession:
        """A new search: prepared, its space profiled, Ray started, its MLflow parent run and its
        resumable state written."""
        uri = config.tracking.uri or default_tracking_uri(results)
        prepared, space, calibration, guidance, modes = _prepare_search(config, uri, results, console)
        config = prepared.config
        work, tracker = results / ".work" / name, None
        try:
            tracker = MlflowSearchRun.create(uri, config.tracking.experiment, name, space,
                                             _tracking_params(config, prepared.task, out),
                                             artifact_root=None if config.tracking.uri else results / "mlartifacts")
            tracker.client.log_text(tracker.parent_id, config_to_yaml(config), "search_config.yaml")
            state = SearchState(name, str(out), config_to_yaml(config), uri, tracker.parent_id, os.getpid(),
                                local_ray_session(), time.time())
            shutil.rmtree(work, ignore_errors=True)  # an earlier, failed search of this name: never reuse its leftovers
            state.save(work)
        except BaseException as exc:
            _abort(tracker, exc)
            _stop_local_ray(config)
            raise
        return cls(name, out, results, prepared, space, guidance.seeds if guidance else None, tracker,
                   _trial_context(prepared, state, work, calibration, guidance, modes), Continuation(study_uri(work), name),
                   console)

    @classmethod
    def resume(cls, config: Config, name: str, out: Path, results: Path, console: Console) -> SearchSession:
        """The search ``name`` whose driver died: what that driver left running ended, its finished
        trials kept (in MLflow too), its unfinished ones closed, and the trials and time it has left."""
        work = results / ".work" / name
        state = _take_over(work, console)
        prepared, space, calibration, guidance, modes = _prepare_search(config, state.tracking_uri, results, console)
        config, tracker = prepared.config, None
        try:
            tracker = MlflowSearchRun.attach(state.tracking_uri, state.parent_run_id, space)
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
            state = replace(state, driver_pid=os.getpid(), ray_session=local_ray_session())
            state.save(work)
        except BaseException as exc:
            _abort(tracker, exc)
            _stop_local_ray(config)
            raise
        return cls(name, out, results, prepared, space, guidance.seeds if guidance else None, tracker,
                   _trial_context(prepared, state, work, calibration, guidance, modes), continuation, console, earlier)

    def run(self) -> list[TrialRecord]:
        """The trials left (with the live progress display), then front recovery (recovery mode
        'front'): every record, the kept ones of a resumed search first."""
        config, task = self.config, self.prepared.task
        goals = objectives(task.metric)
        front = FrontProgress(goals, config.search.patience, quality_floor=config.search.quality_floor,
                              on_change=lambda value, step: self.tracker.log_search_metric("hypervolume", value, step))
        front.records = list(self.earlier)
        left = self.continuation.trials_left if self.continuation.trials_left is not None else config.search.trials
        time_left = self.continuation.time_left_s or config.search.time_budget_s
        with ProgressDisplay(left, goals[0], self.console, front, time_left) as progress:
            records = self.earlier + (run_search(config, self.ctx, self.space, self.work / "ray", self.name,
                                                 listeners=(TrialJournal(self.work), progress, self.tracker),
                                                 front=front, continuation=self.continuation, seeds=self.seeds)
                                      if left > 0 else [])
        if front.should_stop:
            self.console.print(f"stopped: no hypervolume gain in the last {config.search.patience} trials "
                               f"(hypervolume {front.hypervolume:.4f})")
        if config.recovery.mode == "front":
            records += recover_front_points(records, self.ctx, self.tracker, self.console)
        return records

    def publish(self, records: list[TrialRecord]) -> Published:
        """The front timed again in isolation, results/<name>/ written (CSV, plots, plans, the front's
        models), the MLflow parent run finished, and the search's work files removed on every node."""
        config, task = self.config, self.prepared.task
        records, pareto = remeasure_front_points(records, objectives(task.metric), task, config, self.tracker,
                                                 self.console)
        not_faster = not_faster_numbers(records)
        with staged_folder(self.out) as staging:
            write_results(staging, records, pareto, self.space, config_to_yaml(config), task.metric, not_faster)
            keep_front_artifacts(records, pareto, staging / "models")
        self.tracker.finish(records, pareto, self.out, search_summary(records, pareto, task, config.search.quality_floor),
                            not_faster, task.metric)
        shutil.rmtree(self.work, ignore_errors=True)  # finished: nothing left to resume
        for node in alive_nodes():  # and every node's trial files
            on_node(node, remove_tree, str(node_work_dir(self.ctx.shipment.search_id)))
        return Published(records, pareto)

    def abort(self, exc: BaseException) -> None:
        """Interrupted or broken before the end: the parent run must not stay RUNNING."""
        _abort(self.tracker, exc)

    def close(self) -> None:
        """Shut down the Ray runtime this session started locally (a cluster's stays up)."""
        _stop_local_ray(self.config)


def _abort(tracker: MlflowSearchRun | None, exc: BaseException) -> None:
    """The parent run ended KILLED (interrupted) or FAILED (broken), when there is one."""
    if tracker is not None:
        tracker.abort("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")


def _stop_local_ray(config: Config) -> None:
    if ray.is_initialized() and not config.search.address:
        ray.shutdown()


def _prepare_search(config: Config, uri: str, results: Path, console: Console):
    """Checks that fail fast (the store, the cluster), then the prepared task, the calibration
    statistics, the space (narrowed by the sensitivity profile), this machine's kernel modes (a
    local search: measured before Ray starts, on the quiet machine, or read from the results
    folder) and a running Ray."""
    check_reachable(uri)  # both before minutes of preparation
    check_cluster(config.search.address)
    prepared = prepare(config, results, phases_on(console))
    for line in prepared.findings():
        console.print(line)
    config, task = prepared.config, prepared.task
    with Phase(console, "measuring block and head importance on calibration texts"):
        calibration = task_calibration(prepared.loaded.module, task)
        space = make_space(config, prepared.loaded.module, calibration)
    guidance = None
    if config.search.sensitivity:
        guidance, line = sensitivity_guidance(prepared, space, calibration, results, phases_on(console))
        console.print(line)
        space = guidance.space
    console.print(f"space: {len(prepared.layout.blocks)} blocks in {len(space.groups)} groups, "
                  f"{sum(len(v) > 1 for v in space.dimensions().values())} open dimensions; "
                  f"references: {', '.join(space.reference_points()) or 'none in this space'}")
    modes = None if config.search.address else machine_kernel_modes(prepared, results, phases_on(console))
    if modes is not None:  # a local search's one node is this machine: its trials take these
        console.print(kernel_modes_line(current_target().key, modes.modes.describe(), list(modes.figures),
                                        task.metric))
    start_ray(config.search.address)
    return prepared, space, calibration, guidance, modes


def _trial_context(prepared: Prepared, state: SearchState, work: Path, calibration, guidance,
                   modes: MachineModes | None) -> TrialContext:
    search_id = f"{state.name}-{int(state.started_at)}"
    return TrialContext(config=prepared.config, model_source=prepared.loaded.source,
                        task_path=str(prepared.task_path.resolve()), work_dir=str(work.resolve()),
                        lock_path=str(default_lock_path()),
                        shipment=ship(search_id, prepared.loaded.source, prepared.task_path),
                        excluded=guidance.excluded if guidance else (), calibration=calibration.without_training(),
                        known_modes=((modes.key, modes.record()),) if modes else ())


def _take_over(work: Path, console: Console) -> SearchState:
    """Before a resumed search starts Ray: its saved state, with what the dead driver left running ended."""
    state = SearchState.load(work)
    if state.driver_pid != os.getpid() and driver_running(state.driver_pid):
        raise ResumeError(f"search {state.name!r} is still running (driver pid {state.driver_pid}): "
                          "stop it first or let it finish")
    ended = end_session(state.ray_session)
    console.print(f"resuming {state.name}: the dead driver's Ray session left {len(ended)} processes, ended")
    return state


def _tracking_params(config: Config, task: PreparedTask, out: Path) -> dict:
    return {"model": config.model.name, "data": config.task.data, "task_kind": task.kind, "metric": task.metric,
            "output": task.output.name, **({"pooling": task.output.pooling} if task.output.kind == "embedding" else {}),
            "trials": config.search.trials, "workers": config.search.workers, "seed": config.search.seed,
            "sampler": config.search.sampler, "time_budget_s": config.search.time_budget_s, "results_dir": str(out)}


def search_summary(records: list[TrialRecord], pareto: set[int], task: PreparedTask,
                   quality_floor: float) -> dict[str, float]:
    """Counts, the best figure of each objective, and the uncompressed model's figures (``reference_*``)."""
    from slimtune.config import METRIC_GOALS

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
