"""Real servers for the tests, started as processes on 127.0.0.1 and always stopped: a Dask scheduler with
workers, an MLflow tracking server (also the server of ``docs/screenshots/make_screenshots.py``)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]


def spawn_dask(*args: str, cwd: Path) -> subprocess.Popen:
    """``python -m dask <args>`` with the repository importable (the tests' models and data live in ``tests``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "dask", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(procs: list[subprocess.Popen], grace_s: float = 30) -> None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL what is left (warned): no process outlives the tests."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            warnings.warn(f"{' '.join(proc.args[2:4])} ignored SIGTERM for {grace_s:g} s; killed", stacklevel=2)


def dask_scheduler(home: Path, workers: int = 2) -> Iterator[tuple[str, Callable[[str], subprocess.Popen], list]]:
    """``(address, start_worker, workers)``: a scheduler with ``workers`` nanny-less workers (1 thread each)."""
    from fedcore_adapter.distributed import open_client

    procs = [spawn_dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--dashboard-address",
                        "127.0.0.1:0", "--scheduler-file", str(home / "scheduler.json"), cwd=home)]
    deadline = time.time() + 60
    while not (home / "scheduler.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    address = json.loads((home / "scheduler.json").read_text())["address"]

    def start_worker(name: str) -> subprocess.Popen:
        procs.append(spawn_dask("worker", address, "--no-nanny", "--nthreads", "1", "--host", "127.0.0.1",
                                "--no-dashboard", "--name", name, cwd=home))
        return procs[-1]

    started = [start_worker(f"w{i + 1}") for i in range(workers)]
    try:
        with open_client({"address": address, "wait_for_workers": workers, "timeout": 60}):
            pass
        yield address, start_worker, started
    finally:
        # Workers first, then the scheduler: a worker that gets SIGTERM while the closing scheduler also
        # tells it to close can hang in its shutdown (distributed), which left it running before.
        stop(procs[1:])
        stop(procs[:1])
        assert all(proc.poll() is not None for proc in procs)


# -- MLflow -------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs the server in its own process group and kills the group once pytest is gone (even killed -9),
# so no server outlives the test session; argv: pytest's pid, then the server command.
_WATCHDOG = """
import os, signal, subprocess, sys, time
parent = int(sys.argv[1])
server = subprocess.Popen(sys.argv[2:])
while server.poll() is None and os.getppid() == parent:
    time.sleep(0.5)
os.killpg(0, signal.SIGKILL)
"""


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1:<free port>, SQLite store and artifacts under ``root``; yields its URI.

    Ready once a real API call answers (polled); killed with its process group at the end, or as soon as the
    process that started it is gone.
    """
    import requests  # lazy: imported by the MLflow tests only

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner worker pool
    env.pop("MLFLOW_TRACKING_URI", None)
    server = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
              "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
              "--workers", "1"]
    log_file = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *server], stdout=log_file,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{uri}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the watchdog, the server and its uvicorn worker; nothing to save
        proc.wait()
        log_file.close()
