"""A search in MLflow: one parent run per search, one nested run per trial.

Only the driver writes to the store (an SQLite file by default, which takes one writer well;
a server when ``--tracking-uri`` names one). Nested runs carry the readable search params
(``encoder.layer.3.ffn.bits``...), the plan as ``plan.json``, the objectives and timings as
metrics, and the tags ``slimtune.status``, ``slimtune.reference``, ``slimtune.pareto``,
``slimtune.kernels``, ``slimtune.exporter`` (which exporter wrote its graph), ``slimtune.kernel_modes``
(how its 4-/2-bit kernels run, measured per hardware target), ``slimtune.hardware``
(the target its latency belongs to) and ``slimtune.node``.
A failed trial's run ends FAILED with its error; a trial that never finished ends KILLED.

A store that fails now and then does not end a search: every call is retried with backoff, and a
trial whose logging still failed is logged again when the search finishes (a warning says so).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param

from slimtune.config import QUALITY_METRICS
from slimtune.errors import first_line
from slimtune.search.records import TrialRecord
from slimtune.tracking.store import (
    RetryingClient,
    TrackingError,
    check_reachable,
    client,
    ensure_experiment,
    tracking_uri,
)
from slimtune.tracking.views import front_view, run_title

if TYPE_CHECKING:  # a type only: the space pulls in the model layout, and with it torch
    from slimtune.spaces import SearchSpace

_RUN_STATUS = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
log = logging.getLogger("slimtune.tracking")


def _digits(name: str) -> int:
    """Decimals worth showing: 2 for ms and s, 3 for MB, 4 for fractions and scores."""
    if name.endswith(("_ms", "_s")):
        return 2
    return 3 if name.endswith("_mb") else 4


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric figures, rounded for reading in the UI (the CSVs keep 6 decimals)."""
    return {k: round(float(v), _digits(k)) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _flag(value: Any) -> str:
    """A 0/1 figure as the tag values the UI's filters read: 'true' / 'false'."""
    return str(bool(value)).lower()


@dataclass
class MlflowSearchRun:
    """Listener that mirrors a search into MLflow as it runs: ``create`` one for a new search,
    ``attach`` to the parent run of a search being resumed."""

    client: RetryingClient
    uri: str
    experiment_id: str
    parent_id: str
    space: SearchSpace
    run_ids: dict[int, str] = field(default_factory=dict)
    unsynced: dict[int, TrialRecord] = field(default_factory=dict)  # logging failed: logged again at the end
    started: set[int] = field(default_factory=set)  # trials whose run, params and plan are logged

    @classmethod
    def create(cls, uri: str, experiment: str, run_name: str, space: SearchSpace, params: dict[str, Any],
               artifact_root: Path | None = None) -> MlflowSearchRun:
        """A new search's parent run (in ``experiment``, made if missing), with its ``params``."""
        check_reachable(uri)
        try:
            mlflow_client = client(uri)
            experiment_id = ensure_experiment(mlflow_client, experiment, artifact_root)
            parent = mlflow_client.create_run(experiment_id, run_name=run_name, tags={"slimtune.kind": "search"})
        except Exception as exc:  # MLflow raises many types for an unreachable or broken store
            raise TrackingError(f"cannot use the MLflow store {uri} ({first_line(exc)})") from exc
        tracker = cls(RetryingClient(mlflow_client), uri, experiment_id, parent.info.run_id, space)
        tracker._log_params(tracker.parent_id, params)
        return tracker

    @classmethod
    def attach(cls, uri: str, parent_id: str, space: SearchSpace) -> MlflowSearchRun:
        """The tracker of a search being resumed: its parent run found and set running again."""
        check_reachable(uri)
        retrying = RetryingClient(client(uri))
        try:
            parent = retrying.get_run(parent_id)
            retrying.update_run(parent_id, status="RUNNING")
        except Exception as exc:  # MLflow raises many types for an unreachable store or a missing run
            raise TrackingError(f"cannot reopen the search's MLflow run {parent_id} in {uri} "
                                f"({first_line(exc)})") from exc
        return cls(retrying, uri, parent.info.experiment_id, parent_id, space)

    def adopt(self, finished: list[TrialRecord]) -> int:
        """Take over the runs a dead driver left: match its trial runs to the ``finished`` trials (by
        ``slimtune.trial_id``, so none is logged twice) and bring them up to date; close every other
        run it left RUNNING as KILLED. Returns the number the next trial gets."""
        children = self.client.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
                                           max_results=50000)
        by_trial = {run.data.tags.get("slimtune.trial_id"): run for run in children}
        for record in finished:
            run = by_trial.get(record.trial_id)
            if run is not None:
                self.run_ids[record.number] = run.info.run_id
                if run.data.params:
                    self.started.add(record.number)
            if run is None or run.info.status == "RUNNING":
                self._guarded(record, self._sync)
        done = {r.trial_id for r in finished}
        for run in children:
            if run.info.status == "RUNNING" and run.data.tags.get("slimtune.trial_id") not in done:
                self.client.set_tag(run.info.run_id, "slimtune.status", "stopped")
                self.client.set_tag(run.info.run_id, "slimtune.error", "the search's driver died before this trial "
                                                                       "finished; the resumed search sampled anew")
                self.client.set_terminated(run.info.run_id, "KILLED")
        numbers = [int(match.group(1)) for run in children
                   if (match := re.match(r"trial-(\d+)", run.info.run_name or ""))]
        return max(numbers + [r.number for r in finished], default=-1) + 1

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def readable_params(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Every dimension of the space, sampled or fixed, as it applies to this trial, and any extra
        choice the trial carries (``recovery.steps`` of a point recovered after the search)."""
        dims = self.space.dimensions()
        return {**{dim: sampled.get(dim, options[0]) for dim, options in dims.items()},
                **{k: v for k, v in sampled.items() if k not in dims}}

    def _guarded(self, record: TrialRecord, operation) -> None:
        try:
            operation(record)
            self.unsynced.pop(record.number, None)
        except Exception as exc:  # noqa: BLE001 - a failing store must not end the search
            self.unsynced[record.number] = record
            log.warning("MLflow: could not log %s (%s: %s); it is logged again when the search finishes",
                        record.name, type(exc).__name__, first_line(exc, 200))

    def trial_started(self, record: TrialRecord) -> None:
        self._guarded(record, self._start_run)

    def trial_finished(self, record: TrialRecord) -> None:
        self._guarded(record, self._sync)

    def _sync(self, record: TrialRecord) -> None:
        """Bring the trial's run up to date: create it if that failed, then log how it ended."""
        if record.number not in self.started:
            self._start_run(record)
        if record.status != "running":
            self._end_run(record)

    def _start_run(self, record: TrialRecord) -> None:
        """Create the trial's run (once) and log its params and plan; safe to call again after a failure."""
        if record.number not in self.run_ids:
            self.run_ids[record.number] = self._create_run(record)
        run_id = self.run_ids[record.number]
        self._log_params(run_id, self.readable_params(record.params))
        self.client.log_text(run_id, self.space.plan_from_choices(record.params).dumps(), "plan.json")
        self.started.add(record.number)

    def _create_run(self, record: TrialRecord) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=run_title(record),
            tags={"mlflow.parentRunId": self.parent_id, "slimtune.trial_id": record.trial_id,
                  "slimtune.reference": record.reference or "none", "slimtune.status": "running",
                  **({"slimtune.recovered_from": f"trial-{record.recovered_from:03d}"}
                     if record.recovered_from is not None else {})},
        )
        return run.info.run_id

    def _end_run(self, record: TrialRecord) -> None:
        run_id = self.run_ids[record.number]
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in _numeric(record.metrics).items()]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        self.client.set_tag(run_id, "slimtune.status", record.status)
        for key in ("kernels", "exporter", "kernel_modes", "hardware", "node"):
            if record.metrics.get(key):
                self.client.set_tag(run_id, f"slimtune.{key}", record.metrics[key])
        if "machine_busy" in record.metrics:
            self.client.set_tag(run_id, "slimtune.machine_busy", _flag(record.metrics["machine_busy"]))
        if record.error:
            self.client.set_tag(run_id, "slimtune.error", record.error[:4000])
            self.client.set_tag(run_id, "mlflow.note.content", f"**{record.status}**: {record.error[:4000]}")
        self.client.set_terminated(run_id, _RUN_STATUS[record.status])

    def trial_remeasured(self, record: TrialRecord) -> None:
        """A front point timed again in isolation: ``latency_ms`` gets a second value (step 1, the
        published one); the search-time figures stay as ``search_latency_*``."""
        self._guarded(record, self._log_remeasured)

    def _log_remeasured(self, record: TrialRecord) -> None:
        run_id = self.run_ids.get(record.number)
        if run_id is None:
            return
        now = int(time.time() * 1000)
        names = ("latency_ms", "latency_p90_ms", "latency_spread")
        figures = _numeric(record.metrics)
        metrics = [Metric(k, figures[k], now, 1) for k in (*names, "cpu_contention", "machine_busy") if k in figures]
        metrics += [Metric(f"search_{k}", figures[f"search_{k}"], now, 0) for k in names]
        self.client.log_batch(run_id, metrics=metrics)
        self.client.set_tag(run_id, "slimtune.remeasured", "true")
        if "machine_busy" in record.metrics:  # the published timing's, which replaces the search-time one
            self.client.set_tag(run_id, "slimtune.machine_busy", _flag(record.metrics["machine_busy"]))

    def log_search_metric(self, name: str, value: float, step: int) -> None:
        """One point of a metric history on the search's parent run (e.g. the hypervolume per trial)."""
        self.client.log_metric(self.parent_id, name, value, timestamp=int(time.time() * 1000), step=step)

    def finish(self, records: list[TrialRecord], pareto: set[int], results_dir: Path | None,
               summary: dict[str, float], not_faster: set[int] = frozenset(), metric: str | None = None) -> None:
        """The search's end, in order: trials whose logging failed logged again, every trial run
        tagged and titled, the front's models logged, the summary and the results folder on the
        parent run, the front note and saved view, and the parent run closed."""
        self.sync_unsynced(records)
        self.tag_trials(records, pareto, not_faster, metric)
        self.log_front_models(records, pareto, results_dir)
        self.log_summary(summary, results_dir)
        self.publish_front(records, pareto, metric)
        self.client.set_terminated(self.parent_id, "FINISHED")

    def sync_unsynced(self, records: list[TrialRecord]) -> None:
        """Log again the trials whose logging failed during the search (their latest record)."""
        for record in list(self.unsynced.values()):
            self._guarded(next((r for r in records if r.number == record.number), record), self._sync)

    def tag_trials(self, records: list[TrialRecord], pareto: set[int], not_faster: set[int] = frozenset(),
                   metric: str | None = None) -> None:
        """``slimtune.pareto`` on every trial run, ``slimtune.not_faster`` (compressed but not faster
        than fp32) on the completed ones, and run names with the figures (``run_title``)."""
        for record in records:
            run_id = self.run_ids.get(record.number)
            if run_id is None:
                continue
            self.client.set_tag(run_id, "slimtune.pareto", str(record.number in pareto).lower())
            self.client.update_run(run_id, name=run_title(record, record.number in pareto, metric))
            if record.status == "completed":
                self.client.set_tag(run_id, "slimtune.not_faster", str(record.number in not_faster).lower())

    def log_front_models(self, records: list[TrialRecord], pareto: set[int], results_dir: Path | None) -> None:
        """Each front point's ONNX file kept in ``results_dir/models`` as an MLflow model of its run."""
        if results_dir is None:
            return
        for record in records:
            run_id, model = self.run_ids.get(record.number), results_dir / "models" / f"{record.name}.onnx"
            if run_id is not None and record.number in pareto and model.is_file():
                self._guarded(record, lambda r, path=model, run=run_id: self._log_onnx_model(run, path))

    def log_summary(self, summary: dict[str, float], results_dir: Path | None) -> None:
        """The search's summary figures, and everything in ``results_dir`` but the ONNX files (which
        stay in results/ only), on the parent run."""
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_id, metrics=[Metric(k, v, now, 0) for k, v in summary.items()])
        if results_dir is None:
            return
        for path in sorted(results_dir.iterdir()):
            if path.is_dir() and path.name != "models":
                self.client.log_artifacts(self.parent_id, str(path), path.name)
            elif path.is_file():
                self.client.log_artifact(self.parent_id, str(path))

    def publish_front(self, records: list[TrialRecord], pareto: set[int], metric: str | None = None) -> None:
        """The front as the parent run's note, and (given the searched ``metric``) as the saved view
        of the runs table (``front_view``)."""
        self.client.set_tag(self.parent_id, "mlflow.note.content", self._front_note(records, pareto))
        if metric:
            generation = any("ttft_ms" in r.metrics for r in records)
            search = self.client.get_run(self.parent_id).info.run_name
            self.client.set_experiment_tag(self.experiment_id, *front_view(
                search, self.parent_id, metric, generation, int(time.time() * 1000)))

    def _log_onnx_model(self, run_id: str, path: Path) -> None:
        """The front point's ONNX file as an MLflow model of its trial run: listed in the runs table's
        Models column and downloadable from the UI. The tracking URI is set for this call only. Its
        requirements are the flavour's own (onnx, onnxruntime at the installed versions), given
        rather than inferred: inference imports the model in a subprocess, 2 s per front point."""
        import mlflow
        import mlflow.onnx
        import onnx

        with tracking_uri(self.uri), mlflow.start_run(run_id=run_id):
            mlflow.onnx.log_model(onnx.load(str(path)), name="model",
                                  pip_requirements=mlflow.onnx.get_default_pip_requirements())

    def _front_note(self, records: list[TrialRecord], pareto: set[int]) -> str:
        """The parent run's description: the front as a Markdown table, each trial linked to its run."""
        front = [r for r in records if r.number in pareto and r.status == "completed"]
        quality = [k for k in QUALITY_METRICS if any(k in r.metrics for r in front)]
        lines = [f"Pareto front: {len(front)} of {len(records)} trials.", "",
                 "| trial | " + " | ".join(quality) + " | latency ms | size MB |",
                 "|---" * (len(quality) + 3) + "|"]
        for r in sorted(front, key=lambda r: float(r.metrics["latency_ms"])):
            run = f"#/experiments/{self.experiment_id}/runs/{self.run_ids.get(r.number, '')}"
            link = f"[{run_title(r, on_front=True)}]({run})"
            figures = " | ".join(f"{float(r.metrics[k]):.4f}" for k in quality)
            lines.append(f"| {link} | {figures} | {float(r.metrics['latency_ms']):.2f} | "
                         f"{float(r.metrics['size_mb']):.2f} |")
        return "\n".join(lines)

    def abort(self, status: str = "KILLED") -> None:
        self.client.set_terminated(self.parent_id, status)
