"""A separately started ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1, used through
``cluster.address``: the sweep command, failing runs, and a worker killed while its task runs."""
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedcore_adapter.distributed import open_client, run_many
from tests.conftest import TinyDataModule
from tests.helpers import wait_until
from tests.servers import dask_scheduler, spawn_dask, stop

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": {"_target_": "tests.helpers.build_tiny_mlp"}, "data": {"_target_": "tests.helpers.build_tiny_data"},
        "tracking": {"name": "none"}, "setup": "raw", "common": {"latency_repeats": 2, "latency_warmup": 1},
        "nodes": {"0": {"epochs": 1, "progress": False}}}


class SlowData(TinyDataModule):
    """Tiny data whose training batches take 0.25 s; the first batch leaves ``<marker_dir>/<pid>`` behind."""

    def __init__(self, marker_dir: str):
        super().__init__()
        self.marker_dir = Path(marker_dir)

    def train_dataloader(self):
        for i, batch in enumerate(super().train_dataloader()):
            if i == 0:
                (self.marker_dir / str(os.getpid())).write_text("")
            time.sleep(0.25)
            yield batch


def test_the_scheduler_and_workers_listen_on_localhost(scheduler):
    address, _, _ = scheduler
    with open_client({"address": address}) as client:
        workers = client.scheduler_info()["workers"]
    assert address.startswith("tcp://127.0.0.1:") and all(w.startswith("tcp://127.0.0.1:") for w in workers)
    assert sorted(w["name"] for w in workers.values()) == ["w1", "w2"]


def test_the_sweep_command_runs_every_combination_and_reports_bad_overrides_while_the_others_complete(
        scheduler, tmp_path):
    address, _, _ = scheduler
    args = ["sweep", "tracking=none", "model=custom", "model._target_=tests.helpers.build_tiny_mlp", "data=custom",
            "data._target_=tests.helpers.build_tiny_data", "nodes.0.progress=false", "common.latency_repeats=2",
            "nodes.0.epochs=1,-1", "common.seed=1,2", f"cluster.address={address}", "output_dir=out"]
    proc = subprocess.run([sys.executable, "-m", "fedcore_adapter", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr
    assert "2/4 completed, 2 failed" in proc.stdout
    sweep = Path(proc.stdout.strip().splitlines()[-1].removeprefix("sweep: "))
    record = json.loads((tmp_path / sweep / "sweep.json").read_text())
    assert [r["status"] for r in record] == ["completed", "completed", "failed", "failed"]
    assert [r["label"] for r in record] == ["++nodes.0.epochs=1 ++common.seed=1",
                                            "++nodes.0.epochs=1 ++common.seed=2",
                                            "++nodes.0.epochs=-1 ++common.seed=1",
                                            "++nodes.0.epochs=-1 ++common.seed=2"]
    assert record[2]["error"] == "nodes[0] (training).epochs = -1: Input should be greater than or equal to 0"
    for r in record[:2]:  # every run in its own job folder
        assert Path(r["output_dir"]).parent.parent == tmp_path / sweep
        assert json.loads((Path(r["output_dir"]) / "run.json").read_text())["status"] == "completed"
    seeds = [json.loads((Path(r["output_dir"]) / "run.json").read_text()) for r in record[:2]]
    assert seeds[0]["setup_hash"] != seeds[1]["setup_hash"]
    table = (tmp_path / sweep / "comparison.csv").read_text()  # one comparison of the completed runs, and its plot
    assert all(r["output_dir"] in table for r in record[:2])
    assert (tmp_path / sweep / "comparison.md").exists() and (tmp_path / sweep / "comparison.png").stat().st_size > 0
    assert "#2 ++nodes.0.epochs=-1 ++common.seed=1: FAILED: nodes[0] (training).epochs" in proc.stderr


def test_a_worker_killed_while_its_run_is_under_way_has_the_run_redone_elsewhere(scheduler, tmp_path):
    address, start_worker, workers = scheduler
    markers = tmp_path / "markers"
    markers.mkdir()
    slow = {**TINY, "data": {"_target_": "tests.test_distributed_remote.SlowData", "marker_dir": str(markers)}}
    configs = [{**slow, "output_dir": str(tmp_path / f"run{i}"), "common": {**TINY["common"], "seed": i}}
               for i in range(2)]
    results = []
    sweep = threading.Thread(target=lambda: results.extend(
        run_many(configs, {"address": address}, sweep_dir=tmp_path / "sweep", heartbeat_s=2)), daemon=True)
    sweep.start()
    try:
        wait_until(lambda: any(markers.iterdir()), "a run's first training batch", timeout_s=120, poll_s=0.05)
        victim = next(w for w in workers if w.pid == int(next(markers.iterdir()).name))
        os.kill(victim.pid, signal.SIGKILL)  # mid-run: its first training batch has started
        assert victim.wait(timeout=30) == -signal.SIGKILL
        sweep.join(timeout=240)
        assert not sweep.is_alive(), "the sweep did not finish within 240 s of the kill"
        assert [r.status for r in results] == ["completed", "completed"], [r.error for r in results]
        for i, r in enumerate(results):
            run = json.loads((Path(r.value["output_dir"]) / "run.json").read_text())
            assert run["status"] == "completed" and Path(r.value["output_dir"]).parent == tmp_path / f"run{i}"
        assert len({r.worker for r in results}) == 1  # both finished on the surviving worker
        assert len(list(markers.iterdir())) == 2  # the killed run started, then ran again in the survivor
    finally:
        start_worker("w3")  # back to two workers for any later test


TWO_NODES = """\
name: TWO
common: {latency_repeats: 2, latency_warmup: 1}
nodes:
  - {kind: training, epochs: 1, progress: false}
  - {kind: training, epochs: 8, progress: false}
"""


def _kill_workers(address: str, only: int = 0) -> None:
    """SIGKILL the scheduler's workers (or the one with pid ``only``); returns once they are gone."""
    import psutil

    with open_client({"address": address, "wait_for_workers": 0}) as client:
        pids = [pid for pid in client.run(os.getpid).values() if not only or pid == only]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        wait_until(lambda pid=pid: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                   f"worker {pid} to die", timeout_s=30)


def _completed_nodes(run_json: Path) -> int:
    try:
        return json.loads(run_json.read_text()).get("completed_nodes", 0)
    except (OSError, ValueError):
        return 0


def test_a_run_lost_with_its_worker_resumes_from_its_last_finished_node_on_a_shared_folder(scheduler, tmp_path):
    address, start_worker, workers = scheduler
    (tmp_path / "two.yaml").write_text(TWO_NODES)
    cfg = {**TINY, "setup": str(tmp_path / "two.yaml"), "nodes": {}, "output_dir": str(tmp_path / "out"),
           "data": {"_target_": "tests.helpers.SlowTinyData"}}  # 0.2 s a training batch
    results = []
    sweep = threading.Thread(target=lambda: results.extend(
        run_many([cfg], {"address": address}, sweep_dir=tmp_path / "sweep", heartbeat_s=2)), daemon=True)
    sweep.start()
    run_json = tmp_path / "out" / "TWO.partial" / "run.json"
    try:
        wait_until(lambda: _completed_nodes(run_json) == 1, "the first node")
        first = json.loads(run_json.read_text())
        finished_node = tmp_path / "out" / "TWO.partial" / "nodes" / "1_training" / "state.pt"
        stamp = finished_node.stat().st_mtime_ns
        _kill_workers(address, only=first["pid"])  # the run's owner is its worker process
        sweep.join(timeout=240)
        assert not sweep.is_alive() and [r.status for r in results] == ["completed"], [r.error for r in results]
        folder = Path(results[0].value["output_dir"])
        run = json.loads((folder / "run.json").read_text())
        assert folder == tmp_path / "out" / "TWO" and run["status"] == "completed" and run["completed_nodes"] == 2
        assert run["attempt"] == 2 and run["pid"] != first["pid"] and run["resumed_at"]
        assert (folder / "nodes" / "1_training" / "state.pt").stat().st_mtime_ns == stamp  # node 1 was not redone
    finally:
        start_worker("w-resume")
        with open_client({"address": address, "wait_for_workers": 2, "timeout": 60}):
            pass  # two live workers again before any later test


def test_a_sweep_whose_last_worker_dies_fails_after_a_bounded_wait_with_one_line(scheduler, tmp_path, caplog):
    address, start_worker, workers = scheduler
    cfg = {**TINY, "output_dir": str(tmp_path / "out"), "nodes": {"0": {"epochs": 50, "progress": False}},
           "data": {"_target_": "tests.helpers.SlowTinyData"}}  # 0.2 s a training batch
    results = []
    sweep = threading.Thread(target=lambda: results.extend(
        run_many([cfg], {"address": address, "no_worker_timeout": 5}, sweep_dir=tmp_path / "sweep", heartbeat_s=30)),
        daemon=True)
    with open_client({"address": address, "wait_for_workers": 2, "timeout": 60}):
        pass  # every worker started so far has joined: none joins after the kill
    sweep.start()
    try:
        wait_until(lambda: (tmp_path / "out" / "RAW.partial" / "run.json").exists(), "the run to start")
        _kill_workers(address)
        sweep.join(timeout=90)  # 5 s without a worker, not the 30 s heartbeat, nor forever
        assert not sweep.is_alive(), "the sweep kept waiting with no worker"
        [result] = results
        assert result.status == "failed" and result.error.startswith("no live Dask worker for 5 s, so the unfinished "
                                                                     "runs failed; start workers with `dask worker ")
        assert any(r.levelname == "ERROR" and r.getMessage() == result.error for r in caplog.records)
    finally:
        start_worker("w-again-1"), start_worker("w-again-2")
        with open_client({"address": address, "wait_for_workers": 2, "timeout": 60}):
            pass


def test_workers_started_with_dasks_malloc_trim_threshold_get_one_warning_naming_the_fix(tmp_path, caplog,
                                                                                        monkeypatch):
    """A ``dask worker`` with its nanny (Dask's defaults) runs its worker process with MALLOC_TRIM_THRESHOLD_=65536."""
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)  # the nanny below sets Dask's default itself
    servers = dask_scheduler(tmp_path, workers=0)
    address, _, _ = next(servers)
    worker = spawn_dask("worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard", "--name", "n1",
                        cwd=tmp_path)
    try:
        with caplog.at_level(logging.WARNING, logger="fedcore_adapter.distributed"):
            with open_client({"address": address, "wait_for_workers": 1, "timeout": 60}):
                pass
    finally:
        stop([worker])
        servers.close()
    lines = [r.getMessage() for r in caplog.records if "MALLOC_TRIM_THRESHOLD_" in r.getMessage()]
    assert len(lines) == 1 and "1 of 1 worker(s)" in lines[0] and "=65536" in lines[0]
    assert "pre-spawn-environ.MALLOC_TRIM_THRESHOLD_: null" in lines[0]
