"""Low-rank on the MNIST-1D CNN after RAW: every rank strategy at a few thresholds, with and without
fine-tuning: params, MACs, CPU latency and test accuracy, side by side in one process.

RAW (100 epochs of training) runs first; each variant then runs ``low_rank`` (no fine-tune) followed by
a ``training`` node of ``--finetune`` epochs on the RAW model, so the engine measures both rows.
Latency: batch 256, 2 threads, median of interleaved repeats over all final models at the end.

    python benchmarks/low_rank_mnist1d.py [--finetune 10] [--raw-epochs 100] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown  # noqa: E402

from fedcore_adapter import run_setup  # noqa: E402
from fedcore_adapter.metrics import latency_ms  # noqa: E402
from fedcore_adapter.zoo.datamodules import MNIST1DDataModule  # noqa: E402
from fedcore_adapter.zoo.models import MNIST1DCNN  # noqa: E402

VARIANTS = [
    ("energy 0.8", {"thresholds": [0.8]}),
    ("energy 0.9", {"thresholds": [0.9]}),
    ("energy 0.95", {"thresholds": [0.95]}),
    ("explained_variance 0.9", {"spectrum_pruning_strategy": "explained_variance", "thresholds": [0.9]}),
    ("explained_variance 0.95", {"spectrum_pruning_strategy": "explained_variance", "thresholds": [0.95]}),
    ("quantile 0.5", {"spectrum_pruning_strategy": "quantile", "thresholds": [0.5]}),
    ("quantile 0.75", {"spectrum_pruning_strategy": "quantile", "thresholds": [0.75]}),
    ("rank 16", {"spectrum_pruning_strategy": "rank", "rank": 16, "exclude": ["features.0", "classifier.3"]}),
    ("rank_ratio 0.25", {"spectrum_pruning_strategy": "rank_ratio", "thresholds": [0.25]}),
    ("params_ratio 0.3", {"spectrum_pruning_strategy": "params_ratio", "thresholds": [0.3]}),
    ("params_ratio 0.5", {"spectrum_pruning_strategy": "params_ratio", "thresholds": [0.5]}),
    ("budget params 0.5", {"budget": {"metric": "params", "ratio": 0.5}}),
    ("budget params 0.3", {"budget": {"metric": "params", "ratio": 0.3}}),
    ("budget macs 0.5", {"budget": {"metric": "macs", "ratio": 0.5}}),
    ("energy [0.7,0.8,0.9] pick", {"thresholds": [0.7, 0.8, 0.9], "selection_tolerance": 0.01}),
    ("FedCore U,S,Vh 5 ep + energy 0.9", {"epochs": 5, "hoyer_loss": 0.2, "orthogonal_loss": 5, "thresholds": [0.9]}),
    ("falor nsr<0.01 (linear)", {"method": "falor", "nsr_threshold": 0.01}),
    ("falor global nsr<0.05 (linear)", {"method": "falor", "nsr_threshold": 0.05, "allocation": "global"}),
]
QUICK = {"energy 0.9", "budget params 0.5", "FedCore U,S,Vh 5 ep + energy 0.9"}
COMMON = {"measure": True, "num_threads": 2, "latency_repeats": 5, "latency_warmup": 2, "limit_valid_batches": 2}


def latencies(models: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    times = {k: [] for k in models}
    for m in models.values():
        m.eval()
        latency_ms(m, x, torch.device("cpu"), warmup=3, repeats=1, num_threads=2)
    for _ in range(repeats):
        for k, m in models.items():
            times[k] += latency_ms(m, x, torch.device("cpu"), warmup=0, repeats=3, num_threads=2)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--raw-epochs", type=int, default=100)
    parser.add_argument("--finetune", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help=f"only {sorted(QUICK)}")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dm = MNIST1DDataModule()
    out = Path(tempfile.mkdtemp(prefix="low_rank_mnist1d_"))
    start = time.perf_counter()
    raw = run_setup({"name": "RAW", "common": {**COMMON, "seed": 42},
                     "nodes": [{"kind": "training", "epochs": args.raw_epochs}]}, MNIST1DCNN(), dm, output_dir=out)
    raw_row = raw.metrics[-1]
    trained = raw.model.eval()
    base = {"params": raw_row["params"], "macs": raw_row["macs"], "accuracy": raw_row["accuracy"]}
    rows = [{"variant": "RAW (input)", "finetune": "-", **base}]
    finals = {"RAW (input)": trained}
    for name, node in VARIANTS:
        if args.quick and name not in QUICK:
            continue
        setup = {"name": f"lr_{len(rows)}", "common": COMMON,
                 "nodes": [{"kind": "low_rank", **node},
                           {"kind": "training", "epochs": args.finetune, "learning_rate": 1e-3}]}
        t0 = time.perf_counter()
        result = run_setup(setup, copy.deepcopy(trained), dm, output_dir=out)
        wall = time.perf_counter() - t0
        for row, tag in ((result.metrics[1], "no"), (result.metrics[2], f"{args.finetune} ep")):
            rows.append({"variant": name, "finetune": tag, "params": row["params"], "macs": row["macs"],
                         "accuracy": row["accuracy"], "wall_s": wall if tag == "no" else ""})
        finals[name] = result.model.eval()
    x = next(iter(dm.test_dataloader()))[0]
    lat = latencies(finals, x, args.repeats)
    for row in rows:
        row["params_x"] = base["params"] / row["params"]
        row["macs_x"] = base["macs"] / row["macs"]
        row["acc_drop_pts"] = 100 * (base["accuracy"] - row["accuracy"])
        if row["finetune"] != "no":
            row["latency_ms"] = lat[row["variant"]]
            row["speedup"] = lat["RAW (input)"] / lat[row["variant"]]
    print(environment())
    print(f"RAW {args.raw_epochs} epochs; fine-tune {args.finetune} epochs (Adam 1e-3); test set 1000 samples; "
          f"latency batch {x.shape[0]}, 2 threads; total {time.perf_counter() - start:.0f} s")
    print(markdown(rows, ["variant", "finetune", "params", "params_x", "macs", "macs_x", "accuracy", "acc_drop_pts",
                          "latency_ms", "speedup", "wall_s"]))
    ok = [r for r in rows if r["finetune"] not in ("no", "-") and r["params_x"] >= 2 and r["acc_drop_pts"] <= 1]
    print(f"target (>= 2x fewer params, <= 1 point drop after fine-tuning) met by: "
          f"{', '.join(r['variant'] for r in ok) or 'none'}")


if __name__ == "__main__":
    main()
