"""MLflow tracking: the store (``store``), a search's runs (``search_run``) and what the morning
review reads (``views``)."""

from slimtune.tracking.search_run import MlflowSearchRun
from slimtune.tracking.store import (
    RetryingClient,
    TrackingError,
    check_reachable,
    check_scheme,
    default_tracking_uri,
    ensure_experiment,
    tracking_uri,
)
from slimtune.tracking.views import front_view, front_view_key, review_links, run_title, ui_base

__all__ = ["MlflowSearchRun", "RetryingClient", "TrackingError", "check_reachable", "check_scheme",
           "default_tracking_uri", "ensure_experiment", "front_view", "front_view_key", "review_links", "run_title",
           "tracking_uri", "ui_base"]
