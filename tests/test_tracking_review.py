"""The MLflow review as a user meets it: runs typed on the command line, logged to a real ``mlflow server``.

The experiment is a model-training one named after the model and data; each setup run carries its
headline metrics against the input model; names are unique and say what differs; a sweep is the
parent of its setup runs, under Hydra's basic launcher and under the Dask launcher.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.helpers import mlflow_client, runs_of

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=custom", "model._target_=tests.helpers.build_tiny_mlp", "data=custom",
        "data._target_=tests.helpers.build_tiny_data", "nodes.0.epochs=1", "nodes.0.progress=false",
        "common.latency_repeats=2", "output_dir=out"]
EXPERIMENT = "build_tiny_mlp on build_tiny_data"  # a custom model and data: their _target_'s names


def cli(*args, cwd, uri, experiment=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("FEDCORE_PARENT_RUN_ID", None)
    extra = [f"tracking.uri={uri}"] + ([f"tracking.experiment={experiment}"] if experiment else [])
    proc = subprocess.run([sys.executable, "-m", "fedcore_adapter", *args, *TINY, *extra], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def single(mlflow_server, tmp_path_factory):
    """One RAW run of a custom model, typed as a user types it."""
    proc = cli("setup=raw", cwd=tmp_path_factory.mktemp("single"), uri=mlflow_server)
    client = mlflow_client(mlflow_server)
    [parent] = runs_of(client, EXPERIMENT, "setup")
    return {"proc": proc, "client": client, "parent": parent, "uri": mlflow_server,
            "rows": json.loads(Path(parent.data.tags["fedcore.results_dir"], "metrics.json").read_text())}


def test_the_experiment_is_a_model_training_one_named_after_the_model_and_data(single):
    experiment = single["client"].get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    index = requests.get(single["uri"] + "/", timeout=10).text  # the server's own UI knows that kind
    bundle = re.search(r'src="(static-files/static/js/main\.[0-9a-f]+\.js)"', index).group(1)
    assert 'CUSTOM_MODEL_DEVELOPMENT="custom_model_development"' in requests.get(f"{single['uri']}/{bundle}",
                                                                                 timeout=30).text


def test_the_experiment_carries_a_runs_table_view_with_the_headline_columns(single):
    from fedcore_adapter.tracking.store import HEADLINE_VIEW

    experiment = single["client"].get_experiment_by_name(EXPERIMENT)
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{HEADLINE_VIEW}"])
    columns = [c for c in view["selectedColumns"] if c.startswith("metrics.")]
    assert columns[:3] == ["metrics.`accuracy`", "metrics.`accuracy_delta_pt`", "metrics.`compression_ratio`"]
    logged = single["parent"].data.metrics
    assert all(c[len("metrics.`"):-1] in logged for c in columns), columns  # every column has a value
    link = f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey="
    assert link + HEADLINE_VIEW in single["proc"].stdout + single["proc"].stderr  # printed after the run


def test_the_setup_run_carries_final_metrics_ratios_and_the_accuracy_change_in_points(single):
    metrics, (first, last) = single["parent"].data.metrics, (single["rows"][0], single["rows"][-1])
    for key in ("accuracy", "params", "macs", "size_mb", "latency_ms", "throughput_sps"):
        assert metrics[key] == pytest.approx(last[key]), key  # the latest value is the final model's
        if key != "accuracy":
            assert metrics[f"{key}_ratio"] == pytest.approx(last[key] / first[key]), key
    assert metrics["compression_ratio"] == pytest.approx(first["size_mb"] / last["size_mb"])
    assert metrics["speedup"] == pytest.approx(first["latency_ms"] / last["latency_ms"])
    assert metrics["accuracy_delta_pt"] == pytest.approx(100 * (last["accuracy"] - first["accuracy"]))
    assert "accuracy_ratio" not in metrics


def test_run_names_say_setup_model_seed_and_overrides_and_stay_unique(single, tmp_path):
    name = "RAW \N{MIDDLE DOT} build_tiny_mlp \N{MIDDLE DOT} seed=42 \N{MIDDLE DOT} nodes.0.epochs=1"
    assert single["parent"].info.run_name == name + " \N{MIDDLE DOT} common.latency_repeats=2"
    cli("setup=raw", cwd=tmp_path, uri=single["uri"])  # the same run again
    names = [r.info.run_name for r in runs_of(single["client"], EXPERIMENT, "setup")]
    assert len(names) == len(set(names)) == 2 and names[1] == names[0] + " #2"


def test_a_basic_launcher_sweep_is_the_parent_of_its_setup_runs(mlflow_server, tmp_path):
    cli("-m", "setup=raw", "common.seed=0,1", cwd=tmp_path, uri=mlflow_server, experiment="basic_sweep")
    client = mlflow_client(mlflow_server)
    [sweep] = runs_of(client, "basic_sweep", "sweep")
    setups = runs_of(client, "basic_sweep", "setup")
    assert [r.data.tags["mlflow.parentRunId"] for r in setups] == [sweep.info.run_id] * 2
    assert [r.info.run_name.split(" \N{MIDDLE DOT} ")[2] for r in setups] == ["seed=0", "seed=1"]
    assert sweep.info.status == "FINISHED" and sweep.info.run_name.startswith("sweep ")
    assert (sweep.data.metrics["runs"], sweep.data.metrics["completed"], sweep.data.metrics["failed"]) == (2, 2, 0)


def test_a_dask_launcher_sweep_is_the_parent_of_its_setup_runs(mlflow_server, tmp_path):
    cli("-m", "hydra/launcher=dask", "cluster=local", "cluster.n_workers=1", "setup=raw", "common.seed=0,1",
        cwd=tmp_path, uri=mlflow_server, experiment="dask_sweep")
    client = mlflow_client(mlflow_server)
    [sweep] = runs_of(client, "dask_sweep", "sweep")
    setups = runs_of(client, "dask_sweep", "setup")
    assert sorted(r.data.tags["mlflow.parentRunId"] for r in setups) == [sweep.info.run_id] * 2
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["completed"] == 2
    artifacts = {a.path for a in client.list_artifacts(sweep.info.run_id)}
    assert {"sweep.json", "comparison.md", "comparison.csv"} <= artifacts  # the sweep's table, on its run


def test_an_unreachable_store_leaves_the_sweep_runs_unnested_with_a_warning_per_experiment(caplog):
    from tests.servers import free_port
    from fedcore_adapter.tracking.parents import open_parents

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfgs = [{"tracking": {"name": "mlflow", "uri": uri, "http_timeout_s": 1, "http_retries": 0}, "model_name": m}
            for m in ("a", "a", "b")] + [{"tracking": {"name": "none"}}]
    with caplog.at_level("WARNING", logger="fedcore_adapter"):
        assert open_parents(cfgs, name="sweep x") == []
    assert not any(c["tracking"].get("parent_run_id") for c in cfgs)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all(uri in w and "without a parent" in w for w in warnings)  # one per experiment
