"""Tracking: the config group, the default local store, tracking=none, a dead server, concurrent processes."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from fedcore_adapter import run_setup
from fedcore_adapter.errors import ConfigError
from fedcore_adapter.resources import conf_dir
from fedcore_adapter.tracking import PENDING_FILE, TrackingConfig, hook_from_config, resolve_uri, sync_pending
from fedcore_adapter.tracking.journal import PARTIAL_SUFFIX
from fedcore_adapter.tracking.records import StepCounter, flatten, git_commit, numeric_metrics, run_params
from tests.conftest import TinyDataModule, tiny_mlp, tiny_setup
from tests.helpers import mlflow_client, runs_of

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # inside mlflow
TRAIN = {"kind": "training", "epochs": 3, "progress": False}
ROOT = Path(__file__).resolve().parents[1]


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# -- config --------------------------------------------------------------------------------------------
def test_config_group_files_are_valid_tracking_configs():
    mlflow_cfg = TrackingConfig.model_validate(yaml.safe_load((conf_dir() / "tracking" / "mlflow.yaml").read_text()))
    none_cfg = TrackingConfig.model_validate(yaml.safe_load((conf_dir() / "tracking" / "none.yaml").read_text()))
    assert ((mlflow_cfg.name, mlflow_cfg.uri, mlflow_cfg.experiment, mlflow_cfg.log_model)
            == ("mlflow", None, None, True))
    assert none_cfg.name == "none"


def test_tracking_none_gives_no_hook():
    assert hook_from_config({"name": "none"}, {}, "m") is None


def test_experiment_defaults_to_the_model_and_data_names():
    data = {"_target_": "fedcore_adapter.zoo.datamodules.MNIST1DDataModule"}
    hook = hook_from_config({"name": "mlflow"}, {"data": data}, "mnist1d_cnn")
    assert hook.config.experiment == "mnist1d_cnn on mnist1d"
    assert hook_from_config({"name": "mlflow"}, {}, "mnist1d_cnn").config.experiment == "mnist1d_cnn"
    cfg = {"model": {"_target_": "fedcore_adapter.zoo.models.MNIST1DCNN"}, "data": data}
    assert hook_from_config({"name": "mlflow"}, cfg, None).config.experiment == "mnist1d_cnn on mnist1d"
    custom = {"model": {"_target_": "my_pkg.models.build_model"}, "data": {"_target_": "my_pkg.data.MyData"}}
    assert hook_from_config({"name": "mlflow"}, custom, "custom").config.experiment == "build_model on MyData"
    assert hook_from_config({"name": "mlflow", "experiment": "mine"}, cfg, "x").config.experiment == "mine"


@pytest.mark.parametrize("cfg, message", [
    ({"name": "mlfow"}, "tracking.name = 'mlfow': Input should be 'mlflow' or 'none'"),
    ({"name": "mlflow", "url": "x"},
     "tracking.url = 'x': unknown field (did you mean uri?); allowed: experiment, flush_timeout_s, "
     "http_retries, http_timeout_s, log_model, name, parent_run_id, run_name, tags, uri"),
    ({"name": "mlflow", "http_retries": -1}, "tracking.http_retries = -1: Input should be greater than or equal to 0"),
])
def test_bad_tracking_option_is_one_line_naming_the_field(cfg, message):
    with pytest.raises(ConfigError) as err:
        hook_from_config(cfg, {}, None)
    assert str(err.value) == message


def test_default_uri_is_the_sqlite_file_mlflow_ui_opens_in_the_working_directory(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert mlflow.get_tracking_uri() == resolve_uri(None)  # MLflow's own default, which `mlflow ui` opens
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_uri(None) == "http://tracking:5000"
    assert resolve_uri("sqlite:///runs/x.db") == f"sqlite:///{tmp_path / 'runs' / 'x.db'}"
    assert resolve_uri("./mlruns") == str(tmp_path / "mlruns")


# -- records ---------------------------------------------------------------------------------------------
def test_params_are_the_flattened_config_without_volatile_keys_plus_versions():
    params = run_params({"setup": {"name": "T", "nodes": [{"kind": "training", "epochs": 3}]},
                         "common": {}, "resume": True, "loss": None, "tags": ["a", "b"]})
    assert params["setup.name"] == "T" and params["setup.nodes.0.epochs"] == "3" and params["loss"] == "None"
    assert params["tags"] == '["a", "b"]' and "resume" not in params and "common" not in params
    assert set(params) >= {"versions.python", "versions.torch", "versions.mlflow"}
    assert flatten({"weird key!": {"x": 1}}) == {"weird key_.x": "1"}


def test_only_finite_numbers_become_metrics():
    row = {"node_index": 1, "node": "training", "params": 10, "accuracy": 0.5, "loss": float("nan"),
           "sparsity": None, "dtype": "float32", "flag": True}
    assert numeric_metrics(row) == {"params": 10.0, "accuracy": 0.5}
    assert numeric_metrics(row, prefix="input_") == {"input_params": 10.0, "input_accuracy": 0.5}


def test_curve_steps_continue_when_a_node_trains_again():
    steps = StepCounter()
    assert [steps.step("train_loss", s) for s in (1, 2, 3, 1, 2, 1)] == [1, 2, 3, 4, 5, 6]
    assert [steps.step("val_loss", s) for s in (None, None)] == [1, 2]


def test_git_commit_is_the_checkout_of_the_working_directory_of_now(tmp_path, monkeypatch):
    repo, plain = tmp_path / "repo", tmp_path / "plain"
    repo.mkdir(), plain.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(plain)
    assert git_commit() is None
    monkeypatch.chdir(repo)
    assert git_commit() == head


def test_a_record_journaled_while_the_results_folder_is_renamed_lands_in_the_renamed_folder(tmp_path, monkeypatch):
    from fedcore_adapter.tracking import journal

    partial, final = tmp_path / f"RUN{PARTIAL_SUFFIX}", tmp_path / "RUN"
    partial.mkdir()
    applier = journal.Applier(replayer=None, folder=partial, target={"op": "target", "uri": "x"}, warn=print)
    applier._journal([{"op": "metrics", "key": "parent", "metrics": {"a": 1.0}, "step": 1}])
    real = journal.live_folder
    calls = []

    def renamed_right_after_the_check(folder):
        calls.append(folder)
        seen = real(folder)
        if len(calls) == 1:  # the engine renames the folder between the check and the write
            partial.rename(final)
        return seen

    monkeypatch.setattr(journal, "live_folder", renamed_right_after_the_check)
    applier._journal([{"op": "metrics", "key": "parent", "metrics": {"a": 2.0}, "step": 2}])
    steps = [r["step"] for r in journal.read_pending(final / PENDING_FILE)]
    assert steps == [1, 2] and not partial.exists()


def test_journal_knows_the_engine_partial_suffix():
    from fedcore_adapter.results import PARTIAL_SUFFIX as ENGINE_SUFFIX

    assert PARTIAL_SUFFIX == ENGINE_SUFFIX


# -- real stores -----------------------------------------------------------------------------------------
_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from fedcore_adapter import run_setup
    from fedcore_adapter.tracking import MlflowHook

    class Data:
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(64, 8, generator=g)
            self.data = TensorDataset(x, (x @ torch.randn(8, 3, generator=g)).argmax(1))
        def train_dataloader(self):
            return DataLoader(self.data, batch_size=16)
        val_dataloader = test_dataloader = train_dataloader

    i = int(sys.argv[1])
    torch.manual_seed(i)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    setup = {{"name": f"P{{i}}", "common": {{"latency_repeats": 2, "latency_warmup": 1}},
             "nodes": [{{"kind": "training", "epochs": 4, "progress": False}}]}}
    run_setup(setup, model, Data(), output_dir={out!r}, hooks=[MlflowHook(uri={uri!r}, experiment="concurrent")])
""")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh local SQLite store filled by 4 processes at once (each a run with its own logger process)."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    script = _WORKER.format(root=str(ROOT), out=str(root / "results"), uri=uri)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(4)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:  # none left behind when one hangs
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outputs)
    return {"root": root, "uri": uri}


def test_four_processes_logging_to_one_store_at_once_lose_no_run_and_no_metric(store):
    client = mlflow_client(store["uri"])
    parents = runs_of(client, "concurrent", "setup")
    assert sorted(p.data.tags["fedcore.setup"] for p in parents) == ["P0", "P1", "P2", "P3"]
    assert all(p.info.status == "FINISHED" for p in parents)
    children = runs_of(client, "concurrent", "node")
    assert sorted(c.data.tags["mlflow.parentRunId"] for c in children) == sorted(p.info.run_id for p in parents)
    for child in children:
        assert _steps(client, child.info.run_id, "train_loss") == [1, 2, 3, 4]
        assert _steps(client, child.info.run_id, "val_accuracy") == [1, 2, 3, 4]
    for parent in parents:
        assert _steps(client, parent.info.run_id, "accuracy") == [0, 1]
    assert not list((store["root"] / "results").glob(f"*/{PENDING_FILE}"))


def test_default_store_is_mlflow_db_in_the_working_directory(store, monkeypatch):
    monkeypatch.chdir(store["root"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from fedcore_adapter.building import run_from_config

    low_rank = {"kind": "low_rank", "thresholds": [0.9]}
    cfg = {"setup": tiny_setup(TRAIN, low_rank, name="LOCAL"), "tracking": {"name": "mlflow"},
           "model_name": "tiny_model",
           "output_dir": str(store["root"] / "local"), "model": {"_target_": "tests.helpers.build_tiny_mlp"},
           "data": {"_target_": "tests.helpers.build_tiny_data"}}
    result = run_from_config(cfg)
    client = mlflow_client(store["uri"])
    [parent] = runs_of(client, "tiny_model on build_tiny_data", "setup")  # the experiment: model and data names
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "LOCAL \N{MIDDLE DOT} tiny_model \N{MIDDLE DOT} seed=42"
    assert parent.data.params["model._target_"] == "tests.helpers.build_tiny_mlp"
    assert parent.data.params["data._target_"] == "tests.helpers.build_tiny_data"
    assert parent.data.params["setup_resolved.nodes.1.method.thresholds"] == "[0.9]"
    assert parent.info.artifact_uri.startswith(str(store["root"] / "mlruns"))
    assert parent.data.metrics["accuracy"] == pytest.approx(result.metrics[-1]["accuracy"])
    training, decomposed = runs_of(client, "tiny_model on build_tiny_data", "node")
    assert [a.path for a in client.list_artifacts(training.info.run_id)] == ["manifest.json"]
    assert sorted(a.path for a in client.list_artifacts(decomposed.info.run_id)) == [  # the node's files, no weights
        "decompose_config.json", "manifest.json"]


def test_tracking_none_touches_nothing(tmp_path, monkeypatch):
    from fedcore_adapter.building import run_from_config

    monkeypatch.chdir(tmp_path)
    cfg = {"setup": tiny_setup(TRAIN, name="NONE"), "tracking": {"name": "none"}, "output_dir": str(tmp_path / "out"),
           "model": {"_target_": "tests.helpers.build_tiny_mlp"}, "data": {"_target_": "tests.helpers.build_tiny_data"}}
    result = run_from_config(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in result.output_dir.iterdir()) == [
        "config.yaml", "final", "metrics.csv", "metrics.json", "nodes", "run.json"]
    assert "mlflow" not in json.loads((result.output_dir / "run.json").read_text())["state"]


def test_dead_server_never_fails_the_run_warns_once_and_keeps_everything_for_later(store, tmp_path, caplog):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    hook = hook_from_config({"name": "mlflow", "uri": dead, "http_retries": 0}, {}, "dead_model")
    with caplog.at_level(logging.WARNING, logger="fedcore_adapter"):
        result = run_setup(tiny_setup(TRAIN, {"kind": "distillation", "epochs": 1, "progress": False}, name="DEAD"),
                           tiny_mlp(), TinyDataModule(), output_dir=tmp_path, hooks=[hook])
    assert json.loads((result.output_dir / "run.json").read_text())["status"] == "completed"
    warnings = [r.getMessage() for r in caplog.records if "MLflow tracking at" in r.getMessage()]
    assert len(warnings) == 1 and dead in warnings[0]
    kept = [json.loads(line) for line in (result.output_dir / PENDING_FILE).read_text().splitlines()]
    assert [r["op"] for r in kept[:4]] == ["target", "open_parent", "params", "metrics"]
    assert sum(r["op"] == "open_child" for r in kept) == 2 and kept[-1] == {**kept[-1], "op": "close", "key": "parent"}

    assert sync_pending(result.output_dir, tracking_uri=store["uri"]) is True  # sent later, to a store that is up
    assert not (result.output_dir / PENDING_FILE).exists()
    client = mlflow_client(store["uri"])
    [parent] = runs_of(client, "dead_model", "setup")
    children = runs_of(client, "dead_model", "node")
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert _steps(client, children[0].info.run_id, "train_loss") == [1, 2, 3]
    assert _steps(client, parent.info.run_id, "accuracy") == [0, 1, 2]
    assert {"config.yaml", "metrics.csv", "metrics_by_node.png", "model"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}


def test_the_input_model_is_measured_after_the_logger_process_has_started(tmp_path, monkeypatch):
    """A fresh logger process's start-up (mlflow's imports, the store's schema, the run's opening, matplotlib)
    takes a core for seconds; measured beside it, on 2 cores, the input model's latency read twice its own. So
    the tracking hook returns from ``before_run`` (the input row is measured next) once the logger is warm and
    has applied every record sent."""
    from fedcore_adapter.hooks import Hook
    from fedcore_adapter.tracking import channel

    monkeypatch.setattr(channel, "_CONNECTION", None)  # a logger process started by this run
    hook = hook_from_config({"name": "mlflow", "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, {}, "settle")
    seen = {}

    class Probe(Hook):  # runs after the tracking hook, right before the engine measures the input model
        def before_run(self, run):
            seen.update(warm=hook.sink._conn.warm.is_set(), unacked=len(hook.sink._unacked),
                        opened="parent" in hook.sink.ids)

    run_setup(tiny_setup(TRAIN, name="SETTLE"), tiny_mlp(), TinyDataModule(), output_dir=tmp_path,
              hooks=[hook, Probe()])
    assert seen == {"warm": True, "unacked": 0, "opened": True}


def test_without_a_logger_process_the_run_completes_and_keeps_every_record(tmp_path, monkeypatch, caplog):
    from fedcore_adapter.tracking import channel

    def cannot_start():
        raise OSError("cannot start the logger process")

    monkeypatch.setattr(channel, "_CONNECTION", None)
    monkeypatch.setattr(channel, "_Connection", cannot_start)
    hook = hook_from_config({"name": "mlflow", "uri": "http://127.0.0.1:9"}, {}, "m")
    with caplog.at_level(logging.WARNING, logger="fedcore_adapter"):
        result = run_setup(tiny_setup(TRAIN, name="NOLOG"), tiny_mlp(), TinyDataModule(), output_dir=tmp_path,
                           hooks=[hook])
    assert json.loads((result.output_dir / "run.json").read_text())["status"] == "completed"
    assert len([r for r in caplog.records if "MLflow tracking at" in r.getMessage()]) == 1
    kept = [json.loads(line)["op"] for line in (result.output_dir / PENDING_FILE).read_text().splitlines()]
    assert kept[:3] == ["target", "open_parent", "params"]  # every record, in order
    # input, 3 epochs, node row, parent row, ratios
    assert kept.count("metrics") == 1 + 3 + 1 + 1 + 1 and kept[-1] == "close"


def test_settle_returns_when_the_logger_process_dies_with_records_pending(tmp_path, monkeypatch):
    """A logger that dies never acknowledges what it was sent: ``settle`` wakes at its death instead of waiting
    out its timeout, and the records stay pending (journaled when the run closes)."""
    from fedcore_adapter.tracking import channel

    monkeypatch.setattr(channel, "_CONNECTION", None)
    target = {"op": "target", "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "settle"}
    session = channel.LoggerSession(tmp_path, target, lambda text: None, http_timeout_s=1, http_retries=0)
    session._conn.proc.kill()
    session.submit({"op": "metrics", "values": {"a": 1.0}, "step": 0})
    start = time.monotonic()
    assert session.settle(60.0)
    assert time.monotonic() - start < 30
    assert not session._conn.alive and session._unacked
