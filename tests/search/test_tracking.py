"""A search in MLflow: a parent run for the search, the prefix's and each trial's run nested under it, the front
and the trials table as the parent's artifacts."""
from __future__ import annotations

import json

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
    assert parent.data.params["setup"] == "TINY" and parent.data.params["search.trials"] == "2"  # what was searched
    assert result.folder.name == "SEARCH_TINY_tiny"


def test_a_resumed_search_on_a_tracking_server_logs_into_the_same_parent_run(mlflow_server, tmp_path):
    cfg = config(tmp_path, trials=1)
    cfg["tracking"] = {"name": "mlflow", "uri": mlflow_server, "experiment": "search-resume", "log_model": False}
    first = run_search(cfg)
    run_id = json.loads((first.folder / "search.json").read_text())["mlflow_run_id"]
    resumed = run_search({**cfg, "resume": True, "search": {**cfg["search"], "trials": 2}})
    ran = [f"trial_{r['trial']:04d}" for r in resumed.trials if r["same_as"] is None]  # a repeat is told, not run
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("search-resume").experiment_id])
    parents = [r for r in runs if r.data.tags.get("fedcore.role") == "search"]
    assert [p.info.run_id for p in parents] == [run_id]
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["fedcore.status"] == "completed"
    assert parents[0].data.metrics["trials_finished"] == 2
    nested = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id)
    assert nested == ["prefix", *ran] and len(ran) == 2
    assert {a.path for a in client.list_artifacts(run_id, "pareto")}  # the Pareto setups' folder, as artifacts


def test_a_search_given_a_parent_run_nests_under_it_and_its_trials_under_the_search(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    above = client.create_run(client.create_experiment("search-above")).info.run_id
    cfg = config(tmp_path, trials=1)
    cfg["tracking"] = {"name": "mlflow", "uri": uri, "experiment": "search-above", "log_model": False,
                       "parent_run_id": above}
    run_search(cfg)
    runs = client.search_runs([client.get_experiment_by_name("search-above").experiment_id])
    search = [r for r in runs if r.data.tags.get("fedcore.role") == "search"]
    assert len(search) == 1 and search[0].data.tags["mlflow.parentRunId"] == above
    nested = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == search[0].info.run_id}
    assert nested == {"prefix", "trial_0000"}
