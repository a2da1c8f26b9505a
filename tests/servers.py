"""Real servers for the tests, started as processes on 127.0.0.1 and always stopped: a Dask scheduler with workers."""
from __future__ import annotations

import json
import os
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
            warnings.warn(f"{' '.join(proc.args[2:4])} ignored SIGTERM for {grace_s:g} s; killed")


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
