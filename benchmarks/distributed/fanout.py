"""Four independent setups on a 2-worker local Dask cluster vs the same four one after another (2 cores).

    python -m benchmarks.distributed.fanout [--repeats 3] [--setups RAW TEST COMPOSITE_1 COMPOSITE_2]
        [--train-batches 4]

Sequential: ``jobs.run_from_config`` in this process with ``torch.set_num_threads(2)`` (both cores for each
run), and with 1 thread for reference. Distributed: ``distributed.run_many`` on ``cluster=local`` (2 worker
processes x 1 thread), timed cold (cluster start and worker imports included) and warm (a started cluster
whose workers already ran once). Repeats alternate the variants; medians are reported. Every run is
MNIST-1D CNN with the batch limits and epochs below (the setups' chains, scaled down), so that one setup
takes seconds. Before each repeat, ``free_cores`` measures how many of the 2 cores the benchmark really
gets (other work on a shared machine takes the rest): a 2-process speed-up cannot exceed it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


import torch

from fedcore_adapter.distributed import open_client, run_many, run_tasks
from fedcore_adapter.distributed.runs import estimated_work, longest_first, run_config
from fedcore_adapter.building import run_from_config

from benchmarks.common import environment, markdown, median

CLUSTER = {"name": "local", "n_workers": 2, "threads_per_worker": 1}
COMMON = {"limit_train_batches": 4, "limit_valid_batches": 1, "limit_test_batches": 2, "latency_repeats": 5}
# Epochs scaled down (same chains): a setup takes seconds, not the minutes of its full schedule.
SCALE = {"training": {"epochs": 3}, "pruning": {"pruning_iterations": 2, "epochs": 1, "finetune_params": {"epochs": 1}},
         "low_rank": {"method": {"epochs": 1}, "finetune_params": {"epochs": 1}}, "qat": {"epochs": 1}}


def configs(setups: list[str], out: str, train_batches: int = 4) -> list[dict]:
    from fedcore_adapter.building import resolve_setup as load_setup

    cfgs = []
    for s in setups:
        kinds = {n.kind for n in load_setup(s).nodes}
        cfgs.append({"setup": s, "common": {**COMMON, "limit_train_batches": train_batches},
                     "nodes": {k: v for k, v in SCALE.items() if k in kinds},
                     "output_dir": f"{out}/{s}", "tracking": {"name": "none"},
                     "model": {"_target_": "fedcore_adapter.zoo.models.MNIST1DCNN"},
                     "data": {"_target_": "fedcore_adapter.zoo.datamodules.MNIST1DDataModule"}})
    return cfgs


def _spin(n: int) -> float:
    t = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - t


def free_cores(n: int = 3_000_000) -> float:
    """Cores this benchmark actually gets now (the machine is shared): a busy loop alone, then in 2 processes
    at once; 2.0 when both cores are free, 1.0 when other work takes one."""
    import multiprocessing

    alone = min(_spin(n) for _ in range(2))
    with multiprocessing.get_context("fork").Pool(2) as pool:
        both = max(pool.map(_spin, [n, n]))
    return 2 * alone / both


def sequential(cfgs: list[dict], threads: int = 2) -> tuple[float, list[float]]:
    torch.set_num_threads(threads)
    start, walls = time.perf_counter(), []
    try:
        for cfg in cfgs:
            t = time.perf_counter()
            run_from_config(cfg)
            walls.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(2)
    return time.perf_counter() - start, walls


def cold(cfgs: list[dict], out: str) -> float:
    start = time.perf_counter()
    results = run_many(cfgs, CLUSTER, sweep_dir=f"{out}/sweep")
    assert all(r.status == "completed" for r in results), [r.error for r in results]
    return time.perf_counter() - start


WORKERS: list[str] = []  # which worker ran each setup in the last warm repeat


def warm(client, cfgs: list[dict]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    results = run_tasks(client, run_config, [{"cfg": c} for c in cfgs], [c["setup"] for c in cfgs], cwd=os.getcwd(),
                        order=longest_first([estimated_work(c) for c in cfgs]))  # as run_many orders them
    assert all(r.status == "completed" for r in results), [r.error for r in results]
    WORKERS[:] = [r.worker for r in results]
    return time.perf_counter() - start, [r.wall_s for r in results]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setups", nargs="+", default=["RAW", "TEST", "COMPOSITE_1", "COMPOSITE_2"])
    parser.add_argument("--train-batches", type=int, default=4, help="training batches per epoch (run length)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    times: dict[str, list[float]] = {"sequential": [], "sequential_1t": [], "cold": [], "warm": [], "free_cores": []}
    per_run: dict[str, list[list[float]]] = {"sequential": [], "warm": []}
    with tempfile.TemporaryDirectory() as out:
        cfgs = configs(args.setups, out, args.train_batches)
        sequential(cfgs[:1])  # imports and data generation out of the timings
        with open_client(CLUSTER) as client:
            warm(client, cfgs)  # worker imports out of the warm timings
            for _ in range(args.repeats):
                times["free_cores"].append(free_cores())
                wall, walls = sequential(cfgs)
                times["sequential"].append(wall)
                per_run["sequential"].append(walls)
                wall, walls = warm(client, cfgs)
                times["warm"].append(wall)
                per_run["warm"].append(walls)
                times["sequential_1t"].append(sequential(cfgs, threads=1)[0])
                print(f"sequential {times['sequential'][-1]:.1f}s, warm {wall:.1f}s, sequential 1 thread "
                      f"{times['sequential_1t'][-1]:.1f}s, load {os.getloadavg()[0]:.1f}, free cores before "
                      f"{times['free_cores'][-1]:.2f}", file=sys.stderr, flush=True)
        for _ in range(args.repeats):
            times["cold"].append(cold(cfgs, out))
            print(f"cold {times['cold'][-1]:.1f}s", file=sys.stderr, flush=True)
    seq = median(times["sequential"])
    rows = [{"variant": "sequential, 1 process x 2 threads", "wall_s": seq, "speedup": 1.0},
            {"variant": "sequential, 1 process x 1 thread", "wall_s": median(times["sequential_1t"]),
             "speedup": seq / median(times["sequential_1t"])},
            {"variant": "local cluster 2 x 1, warm", "wall_s": median(times["warm"]),
             "speedup": seq / median(times["warm"])},
            {"variant": "local cluster 2 x 1, cold (start included)", "wall_s": median(times["cold"]),
             "speedup": seq / median(times["cold"])}]
    for row in rows:
        row["speedup_vs_1_thread"] = median(times["sequential_1t"]) / row["wall_s"]
    runs = [{"setup": s, "sequential_s": median([w[i] for w in per_run["sequential"]]),
             "in_worker_s": median([w[i] for w in per_run["warm"]]), "worker (last repeat)": WORKERS[i]}
            for i, s in enumerate(args.setups)]
    print(environment(), f"load average {os.getloadavg()[0]:.1f}, {args.repeats} repeats, free cores (median) "
          f"{median(times['free_cores']):.2f}")
    print(markdown(rows, ["variant", "wall_s", "speedup", "speedup_vs_1_thread"]))
    print()
    print(markdown(runs, ["setup", "sequential_s", "in_worker_s", "worker (last repeat)"]))
    print("raw:", {k: [round(v, 2) for v in vs] for k, vs in times.items()})


if __name__ == "__main__":
    main()
