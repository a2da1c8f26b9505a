"""Low-rank on the MNIST-1D CNN after RAW: every rank strategy at a few thresholds, with and without
fine-tuning: params, MACs, CPU latency and test accuracy, side by side in one process.

RAW (100 epochs of training) runs first; each variant then runs ``low_rank`` (no fine-tune) followed by
a ``training`` node of ``--finetune`` epochs on the RAW model (``--raw-cache`` keeps RAW between runs).
Params, MACs (per sample) and test accuracy come from the engine's own functions (count_params,
count_macs, evaluate); the "no" row is the low_rank node's checkpoint reloaded with load_model.
Latency: batch 256, ``--latency-threads`` (1), median of interleaved repeats over all final models.

    python -m benchmarks.low_rank.mnist1d [--finetune 10] [--raw-epochs 100] [--quick] [--raw-cache raw.pt]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedcore_adapter import load_model, run_setup
from fedcore_adapter.metrics import count_macs, count_params, evaluate, latency_ms
from fedcore_adapter.zoo.datamodules import MNIST1DDataModule
from fedcore_adapter.zoo.models import MNIST1DCNN

from benchmarks.common import environment, markdown

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
COMMON = {"measure": False, "limit_valid_batches": 2}


def latencies(models: dict, x: torch.Tensor, repeats: int, threads: int) -> dict[str, float]:
    """Median ms per batch, the models interleaved round by round so load drifts hit all alike."""
    times = {k: [] for k in models}
    for m in models.values():
        m.eval()
        latency_ms(m, x, torch.device("cpu"), warmup=3, repeats=1, num_threads=threads)
    for _ in range(repeats):
        for k, m in models.items():
            times[k] += latency_ms(m, x, torch.device("cpu"), warmup=0, repeats=3, num_threads=threads)
    return {k: statistics.median(v) for k, v in times.items()}


def scores(model, dm, x) -> dict:
    """params, MACs per sample and test accuracy (the engine's own measuring functions)."""
    model.eval()
    acc = evaluate(model, dm.test_dataloader(), torch.nn.CrossEntropyLoss(), torch.device("cpu"))["accuracy"]
    return {"params": count_params(model), "macs": count_macs(model, x), "accuracy": acc}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--raw-epochs", type=int, default=100)
    parser.add_argument("--finetune", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help=f"only {sorted(QUICK)}")
    parser.add_argument("--train-threads", type=int, default=2)
    parser.add_argument("--latency-threads", type=int, default=1,
                        help="threads for timing (1: on a loaded 2-core machine, 2 threads wait on each other)")
    parser.add_argument("--raw-cache", type=str, default=None, help="state dict of the RAW model, reused if present")
    args = parser.parse_args()
    torch.set_num_threads(args.train_threads)  # training; latencies use --latency-threads
    dm = MNIST1DDataModule()
    x = next(iter(dm.test_dataloader()))[0]
    out = Path(tempfile.mkdtemp(prefix="low_rank_mnist1d_"))
    start = time.perf_counter()
    if args.raw_cache and Path(args.raw_cache).exists():
        trained = MNIST1DCNN()
        trained.load_state_dict(torch.load(args.raw_cache, weights_only=True))
    else:
        trained = run_setup({"name": "RAW", "common": {**COMMON, "seed": 42},
                             "nodes": [{"kind": "training", "epochs": args.raw_epochs}]}, MNIST1DCNN(), dm,
                            output_dir=out).model
        if args.raw_cache:
            torch.save(trained.state_dict(), args.raw_cache)
    trained.eval()
    base = scores(trained, dm, x)
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
        decomposed = load_model(result.output_dir / "nodes" / "1_low_rank", MNIST1DCNN())
        rows.append({"variant": name, "finetune": "no", **scores(decomposed, dm, x), "wall_s": wall})
        rows.append({"variant": name, "finetune": f"{args.finetune} ep", **scores(result.model, dm, x)})
        finals[name] = result.model.eval()
        print(rows[-2], rows[-1], flush=True)
    lat = latencies(finals, x, args.repeats, args.latency_threads)
    for row in rows:
        row["params_x"] = base["params"] / row["params"]
        row["macs_x"] = base["macs"] / row["macs"]
        row["acc_drop_pts"] = 100 * (base["accuracy"] - row["accuracy"])
        if row["finetune"] != "no":
            row["latency_ms"] = lat[row["variant"]]
            row["speedup"] = lat["RAW (input)"] / lat[row["variant"]]
    print(environment())
    print(f"RAW {args.raw_epochs} epochs; fine-tune {args.finetune} epochs (Adam 1e-3); test set 1000 samples; "
          f"latency batch {x.shape[0]}, {args.latency_threads} thread(s), median of {args.repeats} x 3 interleaved; "
          f"total {time.perf_counter() - start:.0f} s")
    print(markdown(rows, ["variant", "finetune", "params", "params_x", "macs", "macs_x", "accuracy", "acc_drop_pts",
                          "latency_ms", "speedup", "wall_s"]))
    ok = [r for r in rows if r["finetune"] not in ("no", "-") and r["params_x"] >= 2 and r["acc_drop_pts"] <= 1]
    print(f"target (>= 2x fewer params, <= 1 point drop after fine-tuning) met by: "
          f"{', '.join(r['variant'] for r in ok) or 'none'}")


if __name__ == "__main__":
    main()
