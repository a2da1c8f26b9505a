"""All six named setups on MNIST-1D from one command: final accuracy, params, MACs, size, latency,
throughput and wall time, each as a ratio to RAW.

RAW trains the model from scratch (100 epochs). Every compression setup then starts from the
RAW-trained model (`pretrained=`), as FedCore's `need_pretrain=False` setups expect, and runs its
exact chain (training, pruning, low-rank, quantization nodes with the setup's own epochs).

The latency column is re-timed at the end side by side: every final model is reloaded from its
results folder (``load_model`` on a freshly built CNN) and timed in alternating rounds on the same
batch with 2 threads; the table gives the median of the rounds' medians (the engine's own per-run
latency is in each run's metrics.csv).

    python -m benchmarks.setups.mnist1d [--setups RAW TEST COMPOSITE_1 COMPOSITE_2 QAT_1 PTQ_1] [--out DIR]
                                          [--no-variants] [--recovery]

Besides the six named setups (FedCore's exact parameters), the table has the composite setups
with a milder pruning ratio, as a user would run them (``setup=COMPOSITE_2
nodes.2.pruning_ratio=0.5``): FedCore's ratio 0.75 removes three quarters of the channels in
every pruning node, which compounds along a chain.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedcore_adapter import load_model
from fedcore_adapter.building import run_from_config
from fedcore_adapter.metrics import latency_ms
from fedcore_adapter.zoo.datamodules import MNIST1DDataModule
from fedcore_adapter.zoo.models import MNIST1DCNN

from benchmarks.common import environment, markdown

BASE = {"tracking": {"name": "none"}, "model": {"_target_": "fedcore_adapter.zoo.models.MNIST1DCNN"},
        "data": {"_target_": "fedcore_adapter.zoo.datamodules.MNIST1DDataModule"}}
# label -> (setup, node overrides by index), the CLI's nodes.<i>.<field>=<value>
VARIANTS = {
    "COMPOSITE_1 nodes.1.pruning_ratio=0.5 nodes.3.pruning_ratio=0.1":
        ("COMPOSITE_1", {"1": {"pruning_ratio": 0.5}, "3": {"pruning_ratio": 0.1}}),
    "COMPOSITE_2 nodes.2.pruning_ratio=0.5": ("COMPOSITE_2", {"2": {"pruning_ratio": 0.5}}),
}
# --recovery: the composite setups with the fine-tunes' recovery options changed from their defaults
_FT = ("1", "2", "3")
RECOVERY = {
    "COMPOSITE_2 finetune_params.keep_best=false": ("COMPOSITE_2", {i: {"finetune_params": {"keep_best": False}}
                                                                    for i in _FT}),
    "COMPOSITE_2 finetune_params.distill=true": ("COMPOSITE_2",
                                                 {i: {"finetune_params": {"distill": True}} for i in _FT}),
    "COMPOSITE_2 nodes.2.schedule=geometric": ("COMPOSITE_2", {"2": {"schedule": "geometric"}}),
    "COMPOSITE_1 finetune_params.distill=true": ("COMPOSITE_1",
                                                 {i: {"finetune_params": {"distill": True}} for i in _FT}),
    "COMPOSITE_1 nodes.1.schedule=geometric nodes.3.schedule=geometric":
        ("COMPOSITE_1", {"1": {"schedule": "geometric"}, "3": {"schedule": "geometric"}}),
}
COLUMNS = ["accuracy", "params", "macs", "size_mb", "latency_ms", "throughput_sps"]


def side_by_side_latency(folders: dict[str, Path], rounds: int, repeats: int) -> dict[str, float]:
    """Median over alternating rounds of each final model's median batch latency (ms), 2 threads."""
    models = {name: load_model(folder, MNIST1DCNN()) for name, folder in folders.items()}
    x = next(iter(MNIST1DDataModule().test_dataloader()))[0]
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            per_round[name].append(statistics.median(latency_ms(model, x, torch.device("cpu"), repeats=repeats,
                                                                num_threads=2)))
    return {name: statistics.median(v) for name, v in per_round.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setups", nargs="+", default=["RAW", "TEST", "COMPOSITE_1", "COMPOSITE_2", "QAT_1", "PTQ_1"])
    parser.add_argument("--out", default="composition_results/benchmark_mnist1d")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rounds", type=int, default=7, help="alternating latency rounds at the end")
    parser.add_argument("--no-variants", action="store_true", help="only the named setups")
    parser.add_argument("--recovery", action="store_true",
                        help="add the composite setups with the fine-tunes' recovery options changed (RECOVERY)")
    args = parser.parse_args()
    out = Path(args.out)
    rows, folders = [], {}
    raw_dir = None
    runs = [(name.upper(), name, {}) for name in ["RAW"] + [s for s in args.setups if s.upper() != "RAW"]]
    runs += [] if args.no_variants else [(label, setup, nodes) for label, (setup, nodes) in VARIANTS.items()]
    runs += [(label, setup, nodes) for label, (setup, nodes) in RECOVERY.items()
             if args.recovery and setup in {r[1].upper() for r in runs}]
    for label, name, nodes in runs:
        cfg = {**BASE, "setup": name, "output_dir": str(out), "common": {"seed": args.seed}, "nodes": nodes,
               "model_name": f"variant{len(folders)}" if nodes else None}
        if name.upper() != "RAW":
            cfg["pretrained"] = str(raw_dir)
        start = time.perf_counter()
        result = run_from_config(cfg)
        wall = time.perf_counter() - start
        if name.upper() == "RAW":
            raw_dir = result.output_dir
        final = result.metrics[-1]
        folders[label] = result.output_dir
        print(f"{label}: {final['accuracy']:.4f} accuracy, {final['params']} params, {wall:.0f} s", flush=True)
        rows.append({"setup": label, "chain": " → ".join(r["kind"] for r in result.metrics[1:]),
                     **{c: final[c] for c in COLUMNS}, "dtype": final["dtype"], "wall_s": wall,
                     "batch_size": final.get("batch_size") or 256})
    latency = side_by_side_latency(folders, args.rounds, repeats=20)
    for r in rows:
        r["engine_latency_ms"], r["latency_ms"] = r["latency_ms"], latency[r["setup"]]
        r["throughput_sps"] = 1e3 * r["batch_size"] / r["latency_ms"]
    raw = rows[0]
    table = []
    for r in rows:
        t = {"setup": r["setup"],
             "accuracy": f"{r['accuracy']:.4f} ({100 * (r['accuracy'] - raw['accuracy']):+.1f} pt)"}
        for c in COLUMNS[1:]:
            ratio = raw[c] / r[c] if c != "throughput_sps" else r[c] / raw[c]
            t[c] = f"{r[c]:.4g} ({ratio:.2f}x)"
        t["dtype"], t["wall_s"] = r["dtype"], f"{r['wall_s']:.0f}"
        table.append(t)
    print(environment())
    print("ratios: params/MACs/size/latency as RAW ÷ setup (higher = smaller/faster); throughput as setup ÷ RAW")
    print(markdown(table, list(table[0])))
    (out / "benchmark.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
