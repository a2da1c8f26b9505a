"""RAW on MNIST-1D, exactly as `fedcore-adapter tracking=none` runs it: test accuracy and wall time.

    python -m benchmarks.engine.raw_mnist1d [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time


from fedcore_adapter.building import run_from_config

from benchmarks.common import environment, markdown, median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as out:
            cfg = {"setup": "RAW", "common": {"seed": seed}, "output_dir": out, "tracking": {"name": "none"},
                   "model": {"_target_": "fedcore_adapter.zoo.models.MNIST1DCNN"},
                   "data": {"_target_": "fedcore_adapter.zoo.datamodules.MNIST1DDataModule"}}
            start = time.perf_counter()
            result = run_from_config(cfg)
            wall = time.perf_counter() - start
        last = result.metrics[-1]
        rows.append({"seed": seed, "test_accuracy": last["accuracy"], "training_s": last["wall_s"], "run_wall_s": wall,
                     "params": last["params"], "latency_ms": last["latency_ms"]})
    print(environment())
    print(markdown(rows, list(rows[0])))
    print(f"median test accuracy {median([r['test_accuracy'] for r in rows]):.4f}, "
          f"median wall {median([r['run_wall_s'] for r in rows]):.1f} s")


if __name__ == "__main__":
    main()
