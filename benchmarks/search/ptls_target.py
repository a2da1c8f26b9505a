"""A finished search on a pytorch-lifestream ``SequenceToTarget`` (``model=ptls_seq_to_target data=ptls_target``):
its best trial under the constraint and the reference (the shared prefix's model) timed side by side on one test
batch, in interleaved rounds on one thread (median of the per-round medians), with the figures of trials.csv.

    fedcore-adapter search setup=composite_1 model=ptls_seq_to_target data=ptls_target pretrained=<RAW> \\
        search.trials=16 cluster=local tracking=none output_dir=<OUT>
    python -m benchmarks.search.ptls_target <OUT>/SEARCH_COMPOSITE_1_ptls_seq_to_target [--rounds 7]
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import torch

from fedcore_adapter import load_model
from fedcore_adapter.data import split_batch
from fedcore_adapter.metrics import latency_ms
from fedcore_adapter.zoo.lifestream import sequence_to_target, target_datamodule


def _best(folder: Path) -> dict:
    with open(folder / "pareto.csv") as f:
        front = list(csv.DictReader(f))
    return min(front, key=lambda r: float(r["macs"]))  # the first objective's best on the feasible front


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the search's results folder")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    state = json.loads((args.folder / "search.json").read_text())
    best = _best(args.folder)
    inputs, _ = split_batch(next(iter(target_datamodule().test_dataloader())))
    models = {"reference": load_model(Path(state["reference"]["output_dir"]) / "final", sequence_to_target()),
              "best": load_model(Path(best["output_dir"]) / "final", sequence_to_target())}
    per = {k: [] for k in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            per[name].append(statistics.median(latency_ms(model.eval(), inputs, torch.device("cpu"), repeats=20,
                                                          num_threads=1)))
    ratios = [r / b for r, b in zip(per["reference"], per["best"])]
    print(json.dumps({"best_trial": int(best["trial"]), "chain": best["chain"],
                      "macs_reduction": float(best["macs_reduction"]),
                      "params_reduction": float(best["params_reduction"]),
                      "val_accuracy_drop_pt": float(best["val_accuracy_drop_pt"]),
                      "test_accuracy_drop_pt": float(best["accuracy_drop_pt"]),
                      "latency_ms": {k: statistics.median(v) for k, v in per.items()},
                      "latency_ratio_median": statistics.median(ratios), "rounds": args.rounds}, indent=1))


if __name__ == "__main__":
    main()
