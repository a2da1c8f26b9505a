"""Tracking against a real ``mlflow server`` (SQLite backend, artifacts in a temporary folder), checked with
MlflowClient.

The server is the session's ``mlflow_server`` fixture (tests/conftest.py).
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import socket
import subprocess
import threading
import time

import pytest
import torch

from fedcore_adapter import run_setup
from fedcore_adapter.hooks import Hook
from fedcore_adapter.tracking import MlflowHook, PENDING_FILE, load_logged_model, sync_pending
from tests.conftest import TinyDataModule, tiny_mlp, tiny_setup
from tests.helpers import mlflow_client, runs_of

CHAIN = ({"kind": "training", "epochs": 3, "progress": False}, {"kind": "distillation", "epochs": 2, "progress": False})


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory):
    """One training -> distillation run logged to the server."""
    out = tmp_path_factory.mktemp("tracked")
    hook = MlflowHook(uri=mlflow_server, experiment="server_tiny")
    result = run_setup(tiny_setup(*CHAIN, name="SRV"), tiny_mlp(), TinyDataModule(), output_dir=out, hooks=[hook])
    pending = result.output_dir / PENDING_FILE
    assert not pending.exists(), f"not logged to the server: {pending.read_text()[:1500]}"
    client = mlflow_client(mlflow_server)
    [parent] = runs_of(client, "server_tiny", "setup")
    children = runs_of(client, "server_tiny", "node")
    return {"uri": mlflow_server, "result": result, "client": client, "parent": parent, "children": children}


def test_one_parent_run_per_setup_with_one_nested_child_per_node(tracked):
    parent, children = tracked["parent"], tracked["children"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "SRV \N{MIDDLE DOT} seed=42"
    assert {k: parent.data.tags[k] for k in ("fedcore.setup", "fedcore.status", "fedcore.chain")} == {
        "fedcore.setup": "SRV", "fedcore.status": "completed", "fedcore.chain": "training -> distillation"}
    assert [c.data.tags["mlflow.parentRunId"] for c in children] == [parent.info.run_id] * 2
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)  # the checkout tests run in
    if head.returncode == 0:
        assert parent.data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    else:
        assert "mlflow.source.git.commit" not in parent.data.tags
    assert [(c.data.tags["fedcore.node_index"], c.data.tags["fedcore.node_kind"], c.info.status) for c in children] == [
        ("1", "training", "FINISHED"), ("2", "distillation", "FINISHED")]


def test_parent_params_are_the_flattened_config_and_package_versions(tracked):
    params = tracked["parent"].data.params
    assert params["setup.nodes.0.epochs"] == "3" and params["setup.nodes.1.kind"] == "distillation"
    assert params["setup.common.latency_repeats"] == "2"
    assert params["versions.torch"] == torch.__version__
    assert params["versions.mlflow"] == importlib.metadata.version("mlflow")
    child_params = tracked["children"][0].data.params
    assert child_params["epochs"] == "3" and child_params["kind"] == "training"


def test_every_engine_metric_is_logged_row_0_as_the_parent_baseline(tracked):
    client, parent, rows = tracked["client"], tracked["parent"], tracked["result"].metrics
    metrics = parent.data.metrics
    assert metrics["input_accuracy"] == pytest.approx(rows[0]["accuracy"])
    assert metrics["input_size_mb"] == pytest.approx(rows[0]["size_mb"])
    history = sorted((m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "accuracy"))
    assert [step for step, _ in history] == list(range(len(rows)))
    assert [value for _, value in history] == pytest.approx([row["accuracy"] for row in rows])
    assert metrics["size_mb_ratio"] == pytest.approx(rows[2]["size_mb"] / rows[0]["size_mb"])
    for child, row in zip(tracked["children"], rows[1:]):
        for key in ("params", "macs", "size_mb", "latency_ms", "throughput_sps", "accuracy", "loss", "wall_s"):
            assert child.data.metrics[key] == pytest.approx(row[key]), key


def test_training_curves_are_on_the_node_runs_with_the_epoch_as_step(tracked):
    client, (training, distillation) = tracked["client"], tracked["children"]
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert _steps(client, training.info.run_id, key) == [1, 2, 3], key
    assert _steps(client, distillation.info.run_id, "distill_train_loss") == [1, 2]


def test_artifacts_config_metrics_plot_manifests_and_model(tracked):
    client, parent = tracked["client"], tracked["parent"]
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "metrics.csv", "metrics_by_node.png", "model"} <= names
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "model")} == {
        "model/state.pt", "model/manifest.json", "model/README.md"}
    for child in tracked["children"]:
        assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["manifest.json"]  # no weights per node
    for name in ("metrics.csv", "config.yaml"):
        local = client.download_artifacts(parent.info.run_id, name)
        assert open(local).read() == (tracked["result"].output_dir / name).read_text(), name
    plot = client.download_artifacts(parent.info.run_id, "metrics_by_node.png")
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not (tracked["result"].output_dir / PENDING_FILE).exists()


def test_logged_model_loads_back_and_gives_the_same_outputs(tracked):
    model = load_logged_model(tracked["parent"].info.run_id, tiny_mlp(seed=7), tracking_uri=tracked["uri"])
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(model(x), tracked["result"].model.eval()(x))


def test_compare_reads_the_runs_from_the_tracking_store(tracked, tmp_path):
    from fedcore_adapter.report import main

    assert main(["--tracking-uri", tracked["uri"], "--experiment", "server_tiny", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "comparison.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    assert header[:4] == ["run", "setup", "status", "baseline"]
    final = tracked["result"].metrics[-1]
    srv = next(r for r in rows if r["setup"] == "SRV")
    assert float(srv["accuracy"]) == pytest.approx(final["accuracy"]) and int(srv["params"]) == final["params"]
    assert (srv["runtime"], srv["batch_shape"]) == (final["runtime"], final["batch_shape"])  # text columns too
    base = next(r for r in rows if r["setup"] == "input")
    assert (base["runtime"], base["batch_shape"]) == (tracked["result"].metrics[0]["runtime"],
                                                      tracked["result"].metrics[0]["batch_shape"])
    assert [r["baseline"] for r in rows if r["setup"] == "input"] == ["input"]


class _TcpProxy:
    """127.0.0.1:<port> forwarding to the server; ``close()`` makes the tracking URI unreachable."""

    def __init__(self, target_uri: str, port: int = 0):
        self.target = ("127.0.0.1", int(target_uri.rsplit(":", 1)[1]))
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        for s in [self.listener, *self.sockets]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class _CutAfterFirstNode(Hook):
    """Waits until the parent run exists, then makes the server unreachable after node 1."""

    def __init__(self, tracker: MlflowHook, proxy: _TcpProxy):
        self.tracker, self.proxy = tracker, proxy

    def before_node(self, run, index, node):
        deadline = time.monotonic() + 120
        while index == 0 and not self.tracker.sink.ids.get("parent") and time.monotonic() < deadline:
            time.sleep(0.1)

    def after_node(self, run, index, node, *args):
        if index == 0:
            self.proxy.close()


def test_server_lost_mid_run_finishes_the_run_warns_once_keeps_and_later_sends_the_rest(
        mlflow_server, tmp_path, caplog):
    proxy = _TcpProxy(mlflow_server)
    uri = f"http://127.0.0.1:{proxy.port}"
    tracker = MlflowHook(uri=uri, experiment="server_cut", http_retries=0, http_timeout_s=5)
    with caplog.at_level(logging.WARNING, logger="fedcore_adapter"):
        result = run_setup(tiny_setup(*CHAIN, name="CUT"), tiny_mlp(), TinyDataModule(), output_dir=tmp_path,
                           hooks=[tracker, _CutAfterFirstNode(tracker, proxy)])
    assert json.loads((result.output_dir / "run.json").read_text())["status"] == "completed"
    warnings = [r.getMessage() for r in caplog.records if "MLflow tracking at" in r.getMessage()]
    assert len(warnings) == 1 and uri in warnings[0] and PENDING_FILE in warnings[0]
    pending = result.output_dir / PENDING_FILE
    kept = [json.loads(line)["op"] for line in pending.read_text().splitlines()]
    assert kept[0] == "target" and "bind" in kept and kept[-1] == "close"

    proxy = _TcpProxy(mlflow_server, port=proxy.port)  # the server is back
    try:
        assert sync_pending(result.output_dir) is True
    finally:
        proxy.close()
    assert not pending.exists()
    client = mlflow_client(mlflow_server)
    [parent] = runs_of(client, "server_cut", "setup")  # the same parent run, not a second one
    children = runs_of(client, "server_cut", "node")
    assert parent.info.status == "FINISHED" and [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    assert _steps(client, children[0].info.run_id, "train_loss") == [1, 2, 3]
    assert _steps(client, children[1].info.run_id, "distill_train_loss") == [1, 2]
    assert _steps(client, parent.info.run_id, "accuracy") == [0, 1, 2]
    assert "model" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_resume_continues_logging_into_the_same_parent_run(mlflow_server, tmp_path, monkeypatch):
    from fedcore_adapter import registry

    spec = registry.get_node("distillation")

    def interrupted(model, config, ctx):
        raise KeyboardInterrupt

    setup = tiny_setup(*CHAIN, name="RES")
    monkeypatch.setitem(registry._REGISTRY, "distillation",
                        registry.NodeSpec("distillation", spec.config_cls, interrupted))
    with pytest.raises(KeyboardInterrupt):
        run_setup(setup, tiny_mlp(), TinyDataModule(), output_dir=tmp_path,
                  hooks=[MlflowHook(uri=mlflow_server, experiment="server_resume")])
    state = json.loads((tmp_path / "RES.partial" / "run.json").read_text())["state"]["mlflow"]
    client = mlflow_client(mlflow_server)
    [first] = runs_of(client, "server_resume", "setup")
    assert state["parent_run_id"] == first.info.run_id and first.info.status == "KILLED"

    monkeypatch.setitem(registry._REGISTRY, "distillation", spec)
    run_setup(setup, tiny_mlp(), TinyDataModule(), output_dir=tmp_path, resume=True,
              hooks=[MlflowHook(uri=mlflow_server, experiment="server_resume")])
    [parent] = runs_of(client, "server_resume", "setup")
    assert parent.info.run_id == first.info.run_id and parent.info.status == "FINISHED"
    assert parent.data.tags["fedcore.resumed"] == "true" and parent.data.tags["fedcore.status"] == "completed"
    nodes = [(c.data.tags["fedcore.node_index"], c.info.status) for c in runs_of(client, "server_resume", "node")]
    assert nodes == [("1", "FINISHED"), ("2", "KILLED"), ("2", "FINISHED")]
    assert _steps(client, parent.info.run_id, "accuracy") == [0, 1, 2]
