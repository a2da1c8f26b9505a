"""A real LocalCluster: where it listens, how workers use torch, and ``ctx.map`` on it matching the sequential map."""
import functools
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request

import pytest
import torch
from torch import nn

from fedcore_adapter.context import SequentialExecutor
from fedcore_adapter.distributed import DaskExecutor, executor_from_config, open_client, run_tasks
from fedcore_adapter.errors import ConfigError
from fedcore_adapter.building import run_from_config
from tests.conftest import TinyDataModule


@pytest.fixture(scope="module")
def client():
    # plain TCP (security=false): some tests reach this scheduler by address, without its credentials
    with open_client({"name": "local", "n_workers": 1, "threads_per_worker": 2, "security": False}) as c:
        yield c


def torch_threads(_=None) -> int:
    return torch.get_num_threads()


def executor_inside_a_task(_=None) -> str:
    with executor_from_config({"name": "local"}) as executor:
        return type(executor).__name__


def prune_layer_sensitivity(name: str, model: nn.Module, batches: list) -> float:
    """Loss increase when the smaller half (by magnitude) of layer ``name``'s weights is zeroed (in place, then
    restored: the tasks of one map share ``model`` in a worker)."""
    loss = nn.CrossEntropyLoss()

    def total():
        with torch.inference_mode():
            return sum(float(loss(model(x), y)) for x, y in batches)

    before = total()
    weight = model.get_submodule(name).weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight[weight.abs() < weight.abs().median()] = 0
    try:
        time.sleep(0.05)  # long enough for a concurrent task on the same model to see the change
        return total() - before
    finally:
        with torch.no_grad():
            weight.copy_(original)


def measure_that_fails(item: int) -> int:
    if item == 2:
        raise ValueError(f"layer {item} cannot be measured")
    return item


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_local_cluster_listens_on_localhost_with_worker_processes_and_no_dashboard(client):
    info = client.scheduler_info()
    assert client.scheduler.address.startswith("tcp://127.0.0.1:")
    assert all(addr.startswith("tcp://127.0.0.1:") for addr in info["workers"])
    http = f"http://127.0.0.1:{info['services']['dashboard']}"  # Dask's HTTP server, on localhost only
    assert http_status(f"{http}/health") == 200
    assert [http_status(f"{http}/{page}") for page in ("status", "info/main/workers.html", "metrics")] == [404] * 3
    pids = client.run(os.getpid)
    assert len(pids) == 1 and os.getpid() not in pids.values()


def test_each_worker_sets_torch_threads_to_its_thread_count(client):
    assert client.submit(torch_threads, pure=False).result() == 2  # Dask's nanny alone would leave torch at 1


def test_any_cluster_manager_class_is_used_by_target_with_its_arguments():
    spec = {"_target_": "distributed.LocalCluster", "n_workers": 1, "threads_per_worker": 1, "processes": True,
            "host": "127.0.0.1", "dashboard_address": None}
    with open_client(spec) as c:
        workers = c.scheduler_info()["workers"].values()
        assert [w["nthreads"] for w in workers] == [1] and c.submit(os.getpid, pure=False).result() != os.getpid()


def test_security_true_runs_the_local_cluster_over_temporary_tls_and_tls_settings_reach_a_remote_scheduler():
    with open_client({"name": "local", "n_workers": 1, "security": True}) as c:
        assert c.scheduler.address.startswith("tls://127.0.0.1:")
        assert list(c.scheduler_info()["workers"])[0].startswith("tls://127.0.0.1:")
        assert c.submit(abs, -3, pure=False).result() == 3
        # the same TLS scheduler reached by address: cluster.security's keys go to distributed.Security
        tls = {k: getattr(c.security, k) for k in ("tls_ca_file", "tls_client_cert", "tls_client_key")}
        with open_client({"address": c.scheduler.address, "security": {**tls, "require_encryption": True}}) as remote:
            assert remote.submit(abs, -4, pure=False).result() == 4
        with pytest.raises(ConfigError) as err:
            with open_client({"address": c.scheduler.address}):
                pass
        assert str(err.value) == (f"cluster.address = {c.scheduler.address!r}: a TLS scheduler needs TLS settings; "
                                  f"give cluster.security.tls_ca_file, tls_client_cert and tls_client_key (or "
                                  f"Dask's distributed.comm.tls configuration)")


def test_the_local_cluster_refuses_a_client_without_its_credentials_by_default():
    """cluster=local: temporary TLS unless security=false; another local process cannot run code in it."""
    from distributed import Client
    from distributed.security import Security

    with open_client({"name": "local", "n_workers": 1}) as c:
        address = c.scheduler.address
        assert address.startswith("tls://127.0.0.1:") and c.submit(abs, -2, pure=False).result() == 2
        for intruder in (Security.temporary(), None):  # credentials of its own / none at all (plain TCP)
            with pytest.raises((OSError, TimeoutError)):
                Client(address if intruder else address.replace("tls://", "tcp://"), security=intruder, timeout=3,
                       set_as_default=False)
    with open_client({"name": "local", "n_workers": 1, "security": False}) as plain:
        assert plain.scheduler.address.startswith("tcp://127.0.0.1:")


def test_map_on_the_cluster_returns_the_sequential_results_in_input_order(client):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    batches = [(x, y) for x, y in TinyDataModule().val_dataloader()]
    fn = functools.partial(prune_layer_sensitivity, model=model, batches=batches)
    layers = ["0", "2", "4", "2", "0", "4"]
    distributed = DaskExecutor(client).map(fn, layers)  # one worker with two threads
    assert distributed == SequentialExecutor().map(fn, layers)
    assert distributed[0] == distributed[4] and len(set(distributed[:3])) == 3


def test_an_error_in_one_measurement_is_raised_as_it_would_be_sequentially(client):
    with pytest.raises(ValueError, match="layer 2 cannot be measured"):
        DaskExecutor(client).map(measure_that_fails, [1, 2, 3])


def test_a_run_that_is_itself_a_dask_task_measures_in_its_worker_instead_of_nesting(client):
    assert client.submit(executor_inside_a_task, pure=False).result() == "SequentialExecutor"


def sleep_then(payload: dict) -> float:
    time.sleep(payload["sleep"])
    if "fail" in payload:
        raise ValueError(payload["fail"])
    return payload["sleep"]


def test_progress_is_logged_as_tasks_finish_and_while_they_run(client, caplog):
    payloads = [{"sleep": 0.8}, {"sleep": 0, "fail": "bad override"}, {"sleep": 0}]
    with caplog.at_level(logging.INFO, logger="fedcore_adapter.distributed"):
        results = run_tasks(client, sleep_then, payloads, ["slow", "bad", "quick"], heartbeat_s=0.2)
    assert [(r.label, r.status, r.error) for r in results] == [
        ("slow", "completed", None), ("bad", "failed", "ValueError: bad override"), ("quick", "completed", None)]
    lines = [r.getMessage() for r in caplog.records if r.name == "fedcore_adapter.distributed"]
    counts = r"(\d)/3 finished: (\d) done, (\d) failed, (\d) running, (\d) queued"
    assert re.fullmatch(r"submitted 3 run\(s\): 0/3 finished: 0 done, 0 failed, \d running, \d queued", lines[0])
    finished = [m for line in lines if (m := re.fullmatch(rf"\[{counts}\] #(\d) (\w+): (.*)", line))]
    assert [m[1] for m in finished] == ["1", "2", "3"]  # one line as each task finishes
    what = {m[7]: m[8] for m in finished}
    assert sorted(what) == ["bad", "quick", "slow"]
    assert what["bad"] == "FAILED: ValueError: bad override" and re.fullmatch(r"done in \d+\.\ds", what["slow"])
    assert finished[-1].groups()[:5] == ("3", "2", "1", "0", "0")
    beats = [m for line in lines if (m := re.fullmatch(rf"\[{counts}\] still working", line))]
    assert any(int(m[4]) >= 1 for m in beats), lines  # while the slow task runs and nothing finishes


def same(a, b) -> bool:
    """Equal state-dict values: tensors (int8 ones too), and the tuples packed quantized layers hold."""
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_distributed_compression_gives_the_same_run_as_sequential(client, tmp_path):
    """Low-rank (FALOR rank search), pruning sensitivity and quantization auto_skip send their per-layer
    measurements through ctx.map."""
    setup = tmp_path / "probe.yaml"
    setup.write_text("name: PROBE\ncommon: {latency_repeats: 2, latency_warmup: 1}\nnodes:\n"
                     "  - {kind: training, epochs: 2, progress: false}\n"
                     "  - {kind: low_rank, method: falor, nsr_threshold: 0.05}\n"
                     "  - {kind: pruning, pruning_ratio: 0.5, sensitivity_ratios: [0.25, 0.5]}\n"
                     "  - {kind: ptq_dynamic, auto_skip: {error_budget: 1.0e-4}}\n")
    base = {"setup": str(setup), "model": {"_target_": "tests.test_distributed_executor.wide_mlp"},
            "data": {"_target_": "tests.helpers.build_tiny_data"}, "tracking": {"name": "none"}}
    seq = run_from_config({**base, "output_dir": str(tmp_path / "seq")})
    dist = run_from_config({**base, "output_dir": str(tmp_path / "dist"), "distributed_compression": True,
                            "cluster": {"address": client.scheduler.address}})
    assert dist.setup.common.distributed_compression and not seq.setup.common.distributed_compression
    keys = ("node", "params", "macs", "accuracy", "loss")
    assert [{k: r.get(k) for k in keys} for r in dist.metrics] == [{k: r.get(k) for k in keys} for r in seq.metrics]
    assert dist.metrics[2]["params"] < dist.metrics[1]["params"]  # the ranks the measurements chose were applied
    a, b = seq.model.state_dict(), dist.model.state_dict()
    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    for report in ("nodes/3_pruning/sensitivity.json", "nodes/4_ptq_dynamic/sensitivity.json"):
        assert (dist.output_dir / report).read_text() == (seq.output_dir / report).read_text()
    quant = json.loads((dist.output_dir / "nodes/4_ptq_dynamic/sensitivity.json").read_text())
    assert len(quant["sensitivity"]) == 4 and all(v > 0 for v in quant["sensitivity"].values())  # every layer


def wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))


def test_an_unreachable_scheduler_is_one_clear_error_within_its_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        with open_client({"address": f"tcp://127.0.0.1:{port}", "timeout": 1}):
            pass
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert message.startswith(f"cluster.address = 'tcp://127.0.0.1:{port}': no Dask scheduler answered within 1 s")
    assert "\n" not in message


def started_at(payload: dict) -> float:
    start = time.time()
    time.sleep(payload["sleep"])
    return start


def test_runs_start_in_the_given_order_one_per_worker_and_only_those_count_as_running(caplog):
    with open_client({"name": "local", "n_workers": 1, "threads_per_worker": 1}) as one, \
            caplog.at_level(logging.INFO, logger="fedcore_adapter.distributed"):
        payloads = [{"sleep": 0.3}] * 4
        results = run_tasks(one, started_at, payloads, ["a", "b", "c", "d"], order=[2, 0, 3, 1], heartbeat_s=0.1)
        seen = sorted(range(4), key=lambda i: results[i].value)
        assert seen == [2, 0, 3, 1]
        assert [r.label for r in results] == ["a", "b", "c", "d"]  # results stay in input order
    counts = [re.search(r"(\d) running, (\d) queued", r.getMessage()) for r in caplog.records]
    counts = [(int(m[1]), int(m[2])) for m in counts if m]
    assert (1, 3) in counts and (1, 1) in counts  # while the first run runs, and the third
    assert all(running <= 1 for running, _ in counts), counts  # one worker: never more than one running


def test_a_submission_order_that_is_not_a_permutation_is_refused(client):
    with pytest.raises(ValueError, match="permutation"):
        run_tasks(client, started_at, [{"sleep": 0}] * 2, ["a", "b"], order=[0, 0])


def malloc_trim_threshold(_=None):
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_workers_started_here_run_without_dasks_malloc_trim_threshold(monkeypatch, caplog):
    """Dask's nanny gives its workers MALLOC_TRIM_THRESHOLD_=65536, which slows torch training on CPU ~1.5x."""
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)  # another cluster in this process may have set it
    with caplog.at_level(logging.WARNING, logger="fedcore_adapter.distributed"):
        with open_client({"name": "local", "n_workers": 1, "security": False}) as c:
            values = set(c.run(malloc_trim_threshold).values())
    assert values == {None}
    assert "MALLOC_TRIM_THRESHOLD_" not in caplog.text
