"""A search in MLflow: a parent run for the search, the prefix's and each trial's run nested under it, the front
and the trials table as the parent's artifacts."""
from __future__ import annotations

from mlflow.tracking import MlflowClient

from fedcore_adapter.search.driver import run_search
from tests.search.helpers import config


def test_the_search_is_a_parent_run_with_a_nested_run_per_trial_and_the_front_as_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config(tmp_path, trials=2)
    cfg["tracking"] = {"name": "mlflow", "uri": uri, "experiment": "search-test", "log_model": False}
    result = run_search(cfg)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("search-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("fedcore.role") == "search"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    nested = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert nested == {"prefix", "trial_0000", "trial_0001"}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "pareto.csv", "pareto.png", "pareto"} <= artifacts
    assert parent.data.metrics["trials_finished"] == 2
    assert result.folder.name == "SEARCH_TINY_tiny"
