"""What the morning review reads: run names with the figures, the saved view of the front with its
figures as columns, and direct links into the MLflow UI's runs table."""

from __future__ import annotations

from slimtune.search.records import TrialRecord


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
