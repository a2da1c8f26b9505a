"""Tracking overhead: the same setup with ``tracking=none`` and with MLflow on the default local store.

Each run is a fresh process, as ``fedcore-adapter`` runs it (so the logger process start, its
mlflow imports and the end-of-run flush are all counted); runs alternate between the two modes
and the ratio of medians is reported, for the run itself (``run_from_config``, hook creation to
flush), for the whole process, and for CPU time (the process plus its logger process; less
sensitive than wall time to a machine shared with other work). The store (its tables) is created
first, here, and not counted: it happens once per store, not once per run. The load average is
printed before and after. ``torch.set_num_threads(2)`` in every run.

    python -m benchmarks.tracking.overhead [--setup RAW --epochs 100 --repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import environment, markdown, median

ROOT = Path(__file__).resolve().parents[2]  # the children run as ``python -m`` from a temp folder


def child(args) -> None:
    """One run in this process; prints its timings as JSON."""
    import torch

    torch.set_num_threads(2)
    from fedcore_adapter.building import run_from_config

    cfg = {"setup": args.setup, "nodes": {"0": {"epochs": args.epochs, "progress": False}}, "output_dir": args.out,
           "model": {"_target_": "fedcore_adapter.zoo.models.MNIST1DCNN"},
           "data": {"_target_": "fedcore_adapter.zoo.datamodules.MNIST1DDataModule"},
           "tracking": {"name": "none"} if args.child == "none" else
           {"name": "mlflow", "uri": f"sqlite:///{args.store}/mlflow.db", "experiment": "overhead"}}
    start = time.perf_counter()
    result = run_from_config(cfg)
    run_s = time.perf_counter() - start
    pending = (result.output_dir / "tracking_pending.jsonl").exists()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"run_s": run_s, "accuracy": result.metrics[-1].get("accuracy"), "pending": pending,
                      "cpu_s": usage.ru_utime + usage.ru_stime + _logger_cpu_s()}))


def _logger_cpu_s() -> float:
    """CPU seconds of this process's tracking logger process so far (0 without tracking)."""
    from fedcore_adapter.tracking import channel

    conn = channel._CONNECTION
    if conn is None:
        return 0.0
    fields = Path(f"/proc/{conn.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def run_child(mode: str, args, store: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "benchmarks.tracking.overhead", "--child", mode, "--setup", args.setup,
               "--epochs", str(args.epochs), "--out", out, "--store", str(store)]
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out, env=env)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return {"mode": mode, **json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setup", default="RAW")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["none", "mlflow"])
    parser.add_argument("--out")
    parser.add_argument("--store")
    args = parser.parse_args()
    if args.child:
        return child(args)
    print(f"load average before: {_load()}", flush=True)
    with tempfile.TemporaryDirectory() as store:
        start = time.perf_counter()
        from mlflow import MlflowClient

        MlflowClient(f"sqlite:///{store}/mlflow.db").search_experiments()  # creates the tables
        create_s = time.perf_counter() - start
        rows = []
        for i in range(args.repeats):
            for mode in (("none", "mlflow") if i % 2 == 0 else ("mlflow", "none")):
                rows.append(run_child(mode, args, Path(store)))
                print(rows[-1], flush=True)
    print(environment())
    print(f"load average after: {_load()}")
    print(f"setup {args.setup}, nodes.0.epochs={args.epochs}, {args.repeats} runs per mode, alternating; "
          f"store creation (not counted, includes importing mlflow): {create_s:.1f} s")
    print(markdown(rows, ["mode", "run_s", "process_s", "cpu_s", "accuracy", "pending"]))
    for key in ("run_s", "process_s", "cpu_s"):
        none = median([r[key] for r in rows if r["mode"] == "none"])
        tracked = median([r[key] for r in rows if r["mode"] == "mlflow"])
        print(f"{key}: none median {none:.2f} s, mlflow median {tracked:.2f} s, ratio {tracked / none:.3f} "
              f"({(tracked / none - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
