"""Run the search: Ray Tune schedules trials, Optuna samples plans, Ray callbacks observe.

Ray runs locally unless ``search.address`` names a cluster. Objectives: the task's metric
(``task.metric``, e.g. accuracy or macro_f1, maximised), latency_ms and size_mb (minimised). The
reference points (uncompressed fp32, uniform int8, uniform int8 with FFN pruning) are enqueued
first so every front is read against them. A failing trial ends as ERROR in Ray, FAIL in Optuna,
and the search goes on. Optuna learns of finished trials in trial order (``ordered.py``), so the
same seed, configuration and number of workers propose the same plans.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.config import Config
from slimtune.errors import first_line
from slimtune.evaluators.node_lock import NodeLock
from slimtune.search.front_progress import FrontProgress
from slimtune.search.objectives import objectives
from slimtune.search.ordered import OrderedOptunaSearch
from slimtune.search.records import TrialListener, TrialRecord
from slimtune.search.samplers import make_sampler, quiet_optuna
from slimtune.search.shipping import report_fault
from slimtune.search.trial import TrialContext, measure_modes_on_node, run_trial, search_bit_widths
from slimtune.search.trial_log import TrialLog
from slimtune.search.watchdog import TrialWatchdog
from slimtune.spaces import SearchSpace


class ClusterError(RuntimeError):
    """Ray could not be started or reached."""


@dataclass(frozen=True)
class DefineByRun:
    """The space as Ray's OptunaSearch wants it: a picklable callable that only samples."""

    space: SearchSpace

    def __call__(self, trial: Any) -> None:
        self.space.suggest(trial)


def check_cluster(address: str | None, timeout_s: float = 10.0) -> None:
    """Fail fast on a Ray address nothing answers at (Ray itself waits minutes for its GCS).

    ``host:port`` and ``ray://host:port`` are probed with one TCP connection; ``auto`` and
    ``local`` are left to Ray.
    """
    if not address or address in ("auto", "local"):
        return
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r} is not HOST:PORT (or ray://HOST:PORT): fix --address")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one with "
                           "`ray start --head` or fix --address") from exc


def start_ray(address: str | None) -> None:
    """Connect to the cluster at ``address``, or start a local Ray on 127.0.0.1; worker output stays in Ray's logs."""
    import ray

    if ray.is_initialized():
        return
    try:
        with ray_output_settings():
            _init_ray(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
        raise ClusterError(f"cannot start {where} ({first_line(exc)})") from exc


RAY_OUTPUT = {"RAY_AIR_NEW_OUTPUT": "0", "RAY_DEDUP_LOGS": "0"}
"""Ray's output settings while slimtune drives it (where the caller has not set them): with
``verbose=0``, no tables over the progress display, and worker log lines as they are."""


@contextlib.contextmanager
def ray_output_settings() -> Iterator[None]:
    """``RAY_OUTPUT`` in the environment inside the block (Ray reads it at ``ray.init`` and
    ``Tuner.fit``), and the environment as it was after."""
    added = {name: value for name, value in RAY_OUTPUT.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _init_ray(address: str | None) -> None:
    import ray

    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 _node_ip_address="127.0.0.1")


def patience_stopper(front: FrontProgress):
    """A Ray Tune stopper that ends the search once ``front.should_stop`` (no hypervolume gain for
    ``patience`` trials); running trials are stopped and recorded as such."""
    from ray import tune

    class PatienceStopper(tune.Stopper):
        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            return front.should_stop

    return PatienceStopper()


Measure = Callable[[dict[str, Any], TrialContext], dict[str, Any]]


def _trainable(params: dict[str, Any], ctx: TrialContext, measure: Measure = run_trial) -> None:
    from ray import tune

    search = ctx.config.search
    trial_id = tune.get_context().get_trial_id()
    with TrialWatchdog(lambda reason: report_fault(trial_id, reason), search.trial_timeout_s, search.trial_memory_mb):
        result = measure(params, ctx)
    tune.report(result)


@dataclass(frozen=True)
class Continuation:
    """Where a search keeps its sampler and where it picks up: the Optuna study's storage (an SQLite
    file in the work folder) and name; for a resumed search, the number of its next trial, the
    trials and seconds left, and no second enqueueing of the reference points."""

    study_uri: str
    study_name: str
    resumed: bool = False
    first_number: int = 0
    trials_left: int | None = None
    time_left_s: float | None = None


def run_search(config: Config, ctx: TrialContext, space: SearchSpace, storage: Path,
               name: str, listeners: Sequence[TrialListener] = (),
               front: FrontProgress | None = None, measure: Measure = run_trial,
               continuation: Continuation | None = None,
               seeds: dict[str, dict[str, Any]] | None = None) -> list[TrialRecord]:
    """Run all trials; returns one record per trial, in start order, none left running.

    ``seeds``: plans (params by name) enqueued after fp32 and uniform int8, before the other
    reference points (``enqueued_points``), e.g. the sensitivity profile's (``sensitivity.py``).
    ``front`` (a listener too) tracks the hypervolume; with ``search.patience`` it stops the search.
    ``measure`` is what a trial runs (``run_trial``; tests give functions that fail on purpose).
    ``continuation``: a study kept on disk (resumable), and where a resumed search picks up.
    """
    import optuna
    from ray import tune

    search = config.search
    if config.task.metric is None:
        raise ValueError("config.task.metric is not resolved: pass the config that slimtune.prepare.prepare returns")
    goals = objectives(config.task.metric)
    go_on = continuation or Continuation("", "")
    study = {"storage": optuna.storages.RDBStorage(go_on.study_uri), "study_name": go_on.study_name} \
        if go_on.study_uri else {}
    with quiet_optuna(), ray_output_settings():  # Optuna's INFO lines and Ray's tables, not over the display
        searcher = OrderedOptunaSearch(
            lag=search.workers + 1,  # one proposal of slack: see OrderedOptunaSearch
            space=DefineByRun(space),
            metric=[m for m, _ in goals],
            mode=[mode for _, mode in goals],
            sampler=make_sampler(config),
            points_to_evaluate=None if go_on.resumed else enqueued_points(space, seeds) or None,
            **study,
        )
        trainable = tune.with_resources(tune.with_parameters(_trainable, ctx=ctx, measure=measure),
                                        {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial})
        trial_log = TrialLog(space, goals, ([front] if front else []) + list(listeners), first_number=go_on.first_number,
                             seeds=seeds, hold=NodeLock(Path(ctx.lock_path)).shared)
        trials = go_on.trials_left if go_on.trials_left is not None else search.trials
        budget = go_on.time_left_s if go_on.resumed else search.time_budget_s
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, num_samples=trials, max_concurrent_trials=search.workers,
                time_budget_s=budget, reuse_actors=True, trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage.resolve()), callbacks=[trial_log], verbose=0,
                stop=patience_stopper(front) if front is not None and front.patience else None,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            ),
        )
        early_modes = start_kernel_modes(ctx) if measure is run_trial else []
        try:
            tuner.fit()
        finally:
            stop_tasks(early_modes)
            searcher.flush()  # the last trials' results, told after Tune's last save of the searcher: save it again
            for state_file in (storage / name).glob("searcher-state-*.pkl"):
                searcher.save(str(state_file))
            trial_log.close_open_trials()
        return trial_log.records


def start_kernel_modes(ctx: TrialContext) -> list:
    """When the space offers blockwise formats and the driver did not measure them before the search
    (``ctx.known_modes``: a local search, whose one node is the driver's machine): this search's
    kernel modes measured on every node with CPUs as a Ray task that reserves none
    (``trial.measure_modes_on_node``), started with the search; the references run meanwhile. Its
    references, for ``stop_tasks``."""
    if not search_bit_widths(ctx.config) or ctx.known_modes:
        return []
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(measure_modes_on_node)
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    return [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(ctx)
            for node in nodes]


def stop_tasks(tasks: list) -> None:
    """End the Ray tasks still running (a search that ended before its kernel modes did; a trial
    that needs them measures them itself); a failed one is left to the trials, which measure again."""
    if not tasks:
        return
    import ray

    _, running = ray.wait(tasks, num_returns=len(tasks), timeout=0)
    for task in running:
        ray.cancel(task, force=True)


def enqueued_points(space: SearchSpace, seeds: dict[str, dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The plans every search evaluates first: fp32, uniform int8 and (language models) uniform 4-bit,
    what fronts are read against, then the seeds, then the other reference points (a short budget
    reaches the seeds)."""
    references = space.reference_points()
    first = [references.pop(name) for name in ("fp32", "uniform-int8", "uniform-int4") if name in references]
    return [*first, *(seeds or {}).values(), *references.values()]


def _trial_dirname(trial) -> str:
    # Parameter-laden default names get truncated and are unreadable; the id is enough.
    return f"trial_{trial.trial_id}"
