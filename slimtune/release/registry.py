"""Registering a shipped folder in MLflow: a pyfunc model in its trial's run, a registered model
version, and an alias pointing at it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimtune.release.rebuild import ReleaseError
from slimtune.tracking import tracking_uri

if TYPE_CHECKING:
    from slimtune.release import ExportedModel


def register(exported: ExportedModel, search: str, model_name: str, alias: str | None, uri: str,
             experiment: str) -> str:
    """Log the shipped folder as an MLflow pyfunc model in its trial's run (tagged with the search's
    parent run), register it as ``model_name`` and point ``alias`` at the new version; returns
    ``models:/<name>/<version>``. The tracking URI is set for this call only."""
    import sys
    from types import SimpleNamespace

    import cloudpickle
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from slimtune.release import pyfunc

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    parents = client.search_runs([found.experiment_id], f"attributes.run_name = '{search}' and tags.`slimtune.kind` = "
                                 "'search'", order_by=["attributes.start_time DESC"], max_results=1) if found else []
    if not parents:
        raise ReleaseError(f"no MLflow run of search {search!r} in {uri} (experiment {experiment!r}): "
                           "pass the store the search logged to with --tracking-uri")
    parent = parents[0].info.run_id
    trials = client.search_runs([found.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}' and "
                                f"attributes.run_name LIKE '{exported.trial}%'", max_results=1)
    example = pd.DataFrame({"text": ["a first example text", "and a second one"]})
    shipped = pyfunc.ShippedModel()
    shipped.load_context(SimpleNamespace(artifacts={"shipped": str(exported.folder)}))
    signature = infer_signature(example, shipped.predict(None, example))
    cloudpickle.register_pickle_by_value(sys.modules[pyfunc.__name__])
    try:
        with tracking_uri(uri):
            with mlflow.start_run(run_id=trials[0].info.run_id if trials else parent):
                info = mlflow.pyfunc.log_model(
                    name="shipped", python_model=pyfunc.ShippedModel(), artifacts={"shipped": str(exported.folder)},
                    signature=signature, input_example=example,
                    pip_requirements=["onnxruntime", "tokenizers", "numpy", "pandas", "mlflow"])
            version = mlflow.register_model(info.model_uri, model_name, tags={
                "slimtune.search": search, "slimtune.trial": exported.trial, "slimtune.search_run_id": parent,
                "slimtune.artifact_sha256": exported.artifact_sha256})
        if alias:
            client.set_registered_model_alias(model_name, alias, version.version)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[pyfunc.__name__])
    return f"models:/{model_name}/{version.version}"
