"""The tracking room leaves MLflow's process-wide tracking URI to its caller."""

from __future__ import annotations

import mlflow

from slimtune.tracking import MlflowSearchRun, tracking_uri


def test_the_tracking_uri_is_set_for_a_block_only(tmp_path):
    before = mlflow.get_tracking_uri()
    inside = f"sqlite:///{tmp_path / 'scoped.db'}"
    with tracking_uri(inside):
        assert mlflow.get_tracking_uri() == inside
    assert mlflow.get_tracking_uri() == before


def test_a_search_run_leaves_the_global_tracking_uri_alone(tmp_path):
    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    created = MlflowSearchRun.create(uri, "scoped", "search-a", space=None, params={"trials": 1},
                                     artifact_root=tmp_path / "artifacts")
    attached = MlflowSearchRun.attach(uri, created.parent_id, space=None)
    assert mlflow.get_tracking_uri() == before
    assert (attached.experiment_id, attached.parent_id) == (created.experiment_id, created.parent_id)
    assert attached.client.get_run(created.parent_id).data.params["trials"] == "1"
