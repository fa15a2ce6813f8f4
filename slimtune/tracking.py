"""MLflow tracking: one parent run per search, one nested run per trial.

Only the driver writes to the store (an SQLite file by default, which takes one writer well;
a server when ``--tracking-uri`` names one). Nested runs carry the readable search params
(``encoder.layer.3.ffn.bits``...), the plan as ``plan.json``, the objectives and timings as
metrics, and the tags ``slimtune.status``, ``slimtune.reference``, ``slimtune.pareto``,
``slimtune.kernels``, ``slimtune.hardware`` (the target its latency belongs to) and ``slimtune.node``.
A failed trial's run ends FAILED with its error; a trial that never finished ends KILLED.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param

from slimtune.search.records import TrialRecord
from slimtune.spaces import SearchSpace

_RUN_STATUS = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}


class TrackingError(RuntimeError):
    """The MLflow store could not be reached or written."""


def default_tracking_uri(results_root: Path) -> str:
    return f"sqlite:///{(results_root / 'mlflow.db').resolve()}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a tracking server that does not answer (the client would retry for minutes)."""
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


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


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
            raise TrackingError(f"cannot use the MLflow store {uri} ({str(exc).splitlines()[0][:160]})") from exc
        self.space = space
        self.parent_id = self.parent.info.run_id
        self.run_ids: dict[int, str] = {}
        self._log_params(self.parent_id, params)

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

    def trial_started(self, record: TrialRecord) -> None:
        run = self.client.create_run(
            self.experiment_id, run_name=record.name,
            tags={"mlflow.parentRunId": self.parent_id, "slimtune.trial_id": record.trial_id,
                  "slimtune.reference": record.reference or "none", "slimtune.status": "running",
                  **({"slimtune.recovered_from": f"trial-{record.recovered_from:03d}"}
                     if record.recovered_from is not None else {})},
        )
        self.run_ids[record.number] = run.info.run_id
        self._log_params(run.info.run_id, self.readable_params(record.params))
        plan = self.space.plan_from_choices(record.params)
        self.client.log_text(run.info.run_id, plan.dumps(), "plan.json")

    def trial_finished(self, record: TrialRecord) -> None:
        run_id = self.run_ids.get(record.number)
        if run_id is None:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in _numeric(record.metrics).items()]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        self.client.set_tag(run_id, "slimtune.status", record.status)
        for key in ("kernels", "hardware", "node"):
            if record.metrics.get(key):
                self.client.set_tag(run_id, f"slimtune.{key}", record.metrics[key])
        if record.error:
            self.client.set_tag(run_id, "slimtune.error", record.error[:4000])
        self.client.set_terminated(run_id, _RUN_STATUS[record.status])

    def trial_remeasured(self, record: TrialRecord) -> None:
        """A front point timed again in isolation: ``latency_ms`` gets a second value (step 1, the
        published one); the search-time figures stay as ``search_latency_*``."""
        run_id = self.run_ids.get(record.number)
        if run_id is None:
            return
        now = int(time.time() * 1000)
        names = ("latency_ms", "latency_p90_ms", "latency_spread")
        metrics = [Metric(k, float(record.metrics[k]), now, 1) for k in names]
        metrics += [Metric(f"search_{k}", float(record.metrics[f"search_{k}"]), now, 0) for k in names]
        self.client.log_batch(run_id, metrics=metrics)
        self.client.set_tag(run_id, "slimtune.remeasured", "true")

    def log_search_metric(self, name: str, value: float, step: int) -> None:
        """One point of a metric history on the search's parent run (e.g. the hypervolume per trial)."""
        self.client.log_metric(self.parent_id, name, value, timestamp=int(time.time() * 1000), step=step)

    def finish(self, records: list[TrialRecord], pareto: set[int], results_dir: Path | None,
               summary: dict[str, float], not_faster: set[int] = frozenset()) -> None:
        """Tag every trial run (``slimtune.pareto``, ``slimtune.not_faster``: compressed but not faster
        than fp32), log the summary and the results folder to the parent run, and close it."""
        for record in records:
            run_id = self.run_ids.get(record.number)
            if run_id is not None:
                self.client.set_tag(run_id, "slimtune.pareto", str(record.number in pareto).lower())
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
        self.client.set_terminated(self.parent_id, "FINISHED")

    def abort(self, status: str = "KILLED") -> None:
        self.client.set_terminated(self.parent_id, status)
