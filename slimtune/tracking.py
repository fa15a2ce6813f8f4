"""MLflow tracking: one parent run per search, one nested run per trial.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param

from slimtune.config import QUALITY_METRICS
from slimtune.errors import first_line
from slimtune.search.records import TrialRecord

if TYPE_CHECKING:  # a type only: the space pulls in the model layout, and with it torch
    from slimtune.spaces import SearchSpace

_RUN_STATUS = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
log = logging.getLogger("slimtune.tracking")


class TrackingError(RuntimeError):
    """The MLflow store could not be reached or written."""


def default_tracking_uri(results_root: Path) -> str:
    return f"sqlite:///{(results_root / 'mlflow.db').resolve()}"


def check_scheme(uri: str) -> None:
    """Fail at once on a URI MLflow has no store for (a mistyped scheme); the client would only
    fail at its first write, after the model loads and the profile runs."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    except ImportError:  # another MLflow layout: its own error comes at the first write
        return
    try:
        _tracking_store_registry.get_store_builder(uri)
    except Exception as exc:  # noqa: BLE001 - MLflow's unsupported-scheme exception has no stable import path
        scheme = uri.split(":", 1)[0] if ":" in uri else uri
        raise TrackingError(f"MLflow has no tracking store for {uri!r} (scheme {scheme!r}): give --tracking-uri as "
                            "sqlite:///path.db, file:///folder, http(s)://host:port or a database URI") from exc


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a URI MLflow cannot store to or a tracking server that does not answer (the
    client would retry for minutes)."""
    check_scheme(uri)
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"no MLflow server answers at {uri} ({reason}): start one (slimtune ui) or fix --tracking-uri") from exc


def _client(uri: str):
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no schema-migration chatter over the progress display
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str, artifact_root: Path | None) -> str:
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root else None
    return client.create_experiment(name, artifact_location=location)


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


def run_title(record: TrialRecord, on_front: bool = False, metric: str | None = None) -> str:
    """``trial-003 [front] | accuracy 0.9730 | 24.8 ms | 23.1 MB | uniform-int8-ffn50``: the trial, a
    front marker, once measured its figures, and its role (a reference, or ``recovered trial-005``).
    The runs table shows run names at once, while metric columns must first be added by hand."""
    role = record.reference or (f"recovered trial-{record.recovered_from:03d}" if record.recovered_from is not None else "")
    parts = [record.name + (" [front]" if on_front else "")]
    m = record.metrics
    if metric and record.status == "completed" and metric in m:  # first: the table's name column is narrow
        parts += [f"{metric} {float(m[metric]):.4f}", f"{float(m['latency_ms']):.1f} ms", f"{float(m['size_mb']):.1f} MB"]
    return " | ".join(parts + ([role] if role else []))


def ui_base(uri: str) -> str:
    """Where the MLflow UI for ``uri`` is: the server itself, or what ``slimtune ui`` serves."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


VIEW_TAG_PREFIX = "mlflow.sharedViewState."
"""MLflow's saved views of the runs table are experiment tags under this prefix; the UI lists them
under "Views" and opens one from ``?viewStateShareKey=<the rest of the key>``."""


def front_view_key(parent_id: str) -> str:
    return f"slimtune-front-{parent_id}"


def front_view(search: str, parent_id: str, metric: str, generation: bool, now_ms: int) -> tuple[str, str]:
    """(experiment tag key, value) of the saved view "the front of ``search``": the front's runs,
    fastest first, with the searched metric, latency, size (and time to first token for a causal
    LM) as columns, so the morning review reads figures without picking columns by hand. The value
    is the UI's own envelope (name, times, and the view state as JSON text)."""
    import json

    columns = [f"metrics.`{name}`" for name in (metric, "latency_ms", *(("ttft_ms",) if generation else ()), "size_mb")]
    state = {"searchFilter": f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`slimtune.pareto` = 'true'",
             "orderByKey": "metrics.`latency_ms`", "orderByAsc": True,
             "selectedColumns": [*columns, "tags.`slimtune.reference`", "tags.`slimtune.machine_busy`"],
             "runsHiddenMode": "SHOW_ALL"}
    envelope = {"name": f"slimtune front: {search}", "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)}
    return VIEW_TAG_PREFIX + front_view_key(parent_id), json.dumps(envelope)


def review_links(uri: str, experiment_id: str, parent_id: str) -> dict[str, str]:
    """Direct links into the MLflow UI's runs table (not the GenAI overview): the search's trials,
    and its front as the saved view ``front_view`` (figures as columns)."""
    from urllib.parse import urlencode

    search = f"tags.`mlflow.parentRunId` = '{parent_id}'"
    view = f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?"
    # sorted by a metric, the table lists the trials themselves instead of their parent run folded
    fastest_first = {"workflowType": "machine_learning", "orderByKey": "metrics.`latency_ms`", "orderByAsc": "true"}
    return {"trials": view + urlencode({**fastest_first, "searchFilter": search}),
            "front": view + urlencode({"viewStateShareKey": front_view_key(parent_id)})}


class RetryingClient:
    """An MlflowClient whose calls are retried ``attempts`` times, waiting ``backoff_s`` x 2^n between."""

    def __init__(self, client, attempts: int = 3, backoff_s: float = 0.5) -> None:
        self._client, self._attempts, self._backoff_s = client, attempts, backoff_s

    def __getattr__(self, name: str):
        method = getattr(self._client, name)

        def call(*args, **kwargs):
            for attempt in range(self._attempts):
                try:
                    return method(*args, **kwargs)
                except Exception:  # MLflow raises many types for a store that failed this time
                    if attempt == self._attempts - 1:
                        raise
                    time.sleep(self._backoff_s * 2 ** attempt)
            return None

        return call


class MlflowSearchRun:
    """Listener that mirrors a search into MLflow as it runs."""

    def __init__(self, uri: str, experiment: str, run_name: str, space: SearchSpace,
                 params: dict[str, Any], artifact_root: Path | None = None) -> None:
        check_reachable(uri)
        try:
            self.client = _client(uri)
            self.experiment_id = ensure_experiment(self.client, experiment, artifact_root)
            self.parent = self.client.create_run(self.experiment_id, run_name=run_name,
                                                 tags={"slimtune.kind": "search"})
        except Exception as exc:  # MLflow raises many types for an unreachable or broken store
            raise TrackingError(f"cannot use the MLflow store {uri} ({first_line(exc)})") from exc
        self.client = RetryingClient(self.client)
        self.uri = uri
        self.space = space
        self.parent_id = self.parent.info.run_id
        self.run_ids: dict[int, str] = {}
        self.unsynced: dict[int, TrialRecord] = {}  # trials whose logging failed: logged again at the end
        self.started: set[int] = set()  # trials whose run, params and plan are logged
        self._log_params(self.parent_id, params)

    @classmethod
    def attach(cls, uri: str, parent_id: str, space: SearchSpace) -> MlflowSearchRun:
        """The tracker of a search being resumed: its parent run found and set running again."""
        check_reachable(uri)
        self = cls.__new__(cls)
        try:
            self.client = RetryingClient(_client(uri))
            parent = self.client.get_run(parent_id)
            self.client.update_run(parent_id, status="RUNNING")
        except Exception as exc:  # MLflow raises many types for an unreachable store or a missing run
            raise TrackingError(f"cannot reopen the search's MLflow run {parent_id} in {uri} "
                                f"({first_line(exc)})") from exc
        self.experiment_id, self.parent_id, self.space, self.uri = parent.info.experiment_id, parent_id, space, uri
        self.run_ids, self.unsynced, self.started = {}, {}, set()
        return self

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
                        record.name, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")

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
        """Tag every trial run (``slimtune.pareto``, ``slimtune.not_faster``: compressed but not faster
        than fp32), log the summary and the results folder to the parent run, and close it.
        Trials whose logging failed during the search are logged first."""
        for record in list(self.unsynced.values()):
            self._guarded(next((r for r in records if r.number == record.number), record), self._sync)
        for record in records:
            run_id = self.run_ids.get(record.number)
            if run_id is not None:
                self.client.set_tag(run_id, "slimtune.pareto", str(record.number in pareto).lower())
                self.client.update_run(run_id, name=run_title(record, record.number in pareto, metric))
                if record.number in pareto:
                    model = results_dir / "models" / f"{record.name}.onnx" if results_dir else None
                    if model is not None and model.is_file():
                        self._guarded(record, lambda r, path=model, run=run_id: self._log_onnx_model(run, path))
                if record.status == "completed":
                    self.client.set_tag(run_id, "slimtune.not_faster", str(record.number in not_faster).lower())
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_id, metrics=[Metric(k, v, now, 0) for k, v in summary.items()])
        if results_dir is not None:  # everything but the ONNX files, which stay in results/ only
            for path in sorted(results_dir.iterdir()):
                if path.is_dir() and path.name != "models":
                    self.client.log_artifacts(self.parent_id, str(path), path.name)
                elif path.is_file():
                    self.client.log_artifact(self.parent_id, str(path))
        self.client.set_tag(self.parent_id, "mlflow.note.content", self._front_note(records, pareto))
        if metric:
            generation = any("ttft_ms" in r.metrics for r in records)
            search = self.client.get_run(self.parent_id).info.run_name
            self.client.set_experiment_tag(self.experiment_id, *front_view(
                search, self.parent_id, metric, generation, int(time.time() * 1000)))
        self.client.set_terminated(self.parent_id, "FINISHED")

    def _log_onnx_model(self, run_id: str, path: Path) -> None:
        """The front point's ONNX file as an MLflow model of its trial run: listed in the runs table's
        Models column and downloadable from the UI. The tracking URI is set for this call only. Its
        requirements are the flavour's own (onnx, onnxruntime at the installed versions), given
        rather than inferred: inference imports the model in a subprocess, 2 s per front point."""
        import mlflow
        import mlflow.onnx
        import onnx

        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        try:
            with mlflow.start_run(run_id=run_id):
                mlflow.onnx.log_model(onnx.load(str(path)), name="model",
                                      pip_requirements=mlflow.onnx.get_default_pip_requirements())
        finally:
            mlflow.set_tracking_uri(previous)

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
