"""What Dask costs per task: cluster start, a no-op task, a whole tiny run, a per-layer measurement.

    python -m benchmarks.distributed.overhead [--tasks 200] [--runs 8]

- cluster start: ``open_client(cluster=local)`` (2 worker processes x 1 thread) until workers are ready;
- no-op round trip: one ``run_tasks`` task (run lock, cwd, error capture included), median;
- no-op throughput: ``--tasks`` no-op tasks through ``run_tasks`` on 2 workers, wall / tasks;
- ``ctx.map`` overhead: ``DaskExecutor.map`` of a trivial function over ``--tasks`` items vs in-process;
- tiny runs: ``--runs`` RAW runs of a 387-parameter MLP (1 epoch, 6 batches) in-process vs on the warm
  cluster: the per-run cost of shipping a whole pipeline to a worker.
"""
from __future__ import annotations

import argparse
import os
import time


import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcore_adapter.context import SequentialExecutor
from fedcore_adapter.distributed import DaskExecutor, open_client, run_tasks
from fedcore_adapter.distributed.runs import run_config
from fedcore_adapter.building import run_from_config

from benchmarks.common import environment, markdown, median

CLUSTER = {"name": "local", "n_workers": 2, "threads_per_worker": 1}


def build_tiny_mlp() -> nn.Module:
    """A 387-parameter MLP: 8 features -> 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


class TinyData:
    """A linearly separable 3-class problem: 96 train, 32 val, 32 test samples of 8 features."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(8, 3, generator=g)

        def make(n: int) -> TensorDataset:
            x = torch.randn(n, 8, generator=g)
            return TensorDataset(x, (x @ w).argmax(1))

        self.splits = {"train": make(96), "val": make(32), "test": make(32)}

    def train_dataloader(self):
        return DataLoader(self.splits["train"], batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return DataLoader(self.splits["val"], batch_size=16)

    def test_dataloader(self):
        return DataLoader(self.splits["test"], batch_size=16)


def noop(x):
    return x


def tiny(i: int, out: str) -> dict:
    return {"setup": "RAW", "output_dir": out, "model_name": f"m{i}", "tracking": {"name": "none"},
            "common": {"latency_repeats": 2, "latency_warmup": 1}, "nodes": {"0": {"epochs": 1, "progress": False}},
            "model": {"_target_": "benchmarks.distributed.overhead.build_tiny_mlp"},
            "data": {"_target_": "benchmarks.distributed.overhead.TinyData"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        run_from_config(tiny(0, out))  # imports out of the timings
        starts = []
        for _ in range(3):
            t = time.perf_counter()
            with open_client(CLUSTER):
                starts.append(time.perf_counter() - t)
        rows.append({"what": "cluster start (2 workers, until ready)", "value": median(starts) * 1e3, "unit": "ms"})
        with open_client(CLUSTER) as client:
            run_tasks(client, run_config, [{"cfg": tiny(i, out)} for i in range(2)], ["warm"] * 2)  # worker imports
            trips = []
            for _ in range(30):
                t = time.perf_counter()
                run_tasks(client, noop, [1], ["noop"])
                trips.append(time.perf_counter() - t)
            rows.append({"what": "no-op task round trip", "value": median(trips) * 1e3, "unit": "ms"})
            t = time.perf_counter()
            run_tasks(client, noop, list(range(args.tasks)), ["noop"] * args.tasks)
            rows.append({"what": f"no-op tasks, {args.tasks} on 2 workers",
                         "value": (time.perf_counter() - t) / args.tasks * 1e3, "unit": "ms / task"})
            t = time.perf_counter()
            DaskExecutor(client).map(noop, range(args.tasks))
            dask_map = time.perf_counter() - t
            t = time.perf_counter()
            SequentialExecutor().map(noop, range(args.tasks))
            rows.append({"what": f"ctx.map of a trivial function, {args.tasks} items",
                         "value": (dask_map - (time.perf_counter() - t)) / args.tasks * 1e3, "unit": "ms / item"})
            seq, dist = [], []
            for _ in range(3):
                t = time.perf_counter()
                for i in range(args.runs):
                    run_from_config(tiny(i, out))
                seq.append(time.perf_counter() - t)
                t = time.perf_counter()
                results = run_tasks(client, run_config, [{"cfg": tiny(i, out)} for i in range(args.runs)],
                                    ["tiny"] * args.runs)
                dist.append(time.perf_counter() - t)
                assert all(r.status == "completed" for r in results)
            in_worker = median([r.wall_s for r in results])
            rows.append({"what": f"tiny run in-process (median of {args.runs})", "value": median(seq) / args.runs * 1e3,
                         "unit": "ms / run"})
            rows.append({"what": "tiny run inside its task on a worker", "value": in_worker * 1e3, "unit": "ms / run"})
            rows.append({"what": f"{args.runs} tiny runs: in-process / on 2 workers",
                         "value": median(seq) / median(dist), "unit": "x"})
    print(environment(), f"load average {os.getloadavg()[0]:.1f}")
    print(markdown(rows, ["what", "value", "unit"]))


if __name__ == "__main__":
    main()
