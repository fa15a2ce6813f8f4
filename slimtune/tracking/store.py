"""The MLflow store: checking a tracking URI before minutes of work, a client whose calls are
retried, and the tracking URI set for one block only (MLflow's fluent API reads a process-wide one).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path


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


def client(uri: str):
    """An MlflowClient of ``uri`` (the process-wide tracking URI left as it is)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking (and registry) URI set to ``uri`` inside the block, and put
    back after: for the fluent calls (``mlflow.start_run``, ``log_model``, ``register_model``)
    that take no client."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def ensure_experiment(client, name: str, artifact_root: Path | None) -> str:
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root else None
    return client.create_experiment(name, artifact_location=location)


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
