"""Structured pruning of the MNIST-1D CNN trained by RAW: params, MACs, size, latency, accuracy vs unpruned.

    python -m benchmarks.pruning.mnist1d [--ratios 0.25 0.5 0.75] [--seeds 42] [--rounds 15] [--threads 1]

Per seed: RAW (training, 100 epochs) trains the CNN; then, for each ratio, a
``pruning`` node (FedCore-style: magnitude importance, importance_norm=1, 3
iterations with 5 fine-tune epochs between them, 20 final fine-tune epochs)
prunes a copy. Params, MACs, size and test accuracy are the engine's measured
rows. Latency is re-measured side by side in this one process: every round
times every model (``metrics.latency_ms``, ``--threads`` threads, batch 256 =
the engine's evaluation batch, and batch 1), and the medians over rounds are
compared. The default is 1 thread: on a shared, loaded machine 2-thread
timings swing tenfold with the other processes (OpenMP threads descheduled),
which no median over rounds removes.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch

from fedcore_adapter import run_setup
from fedcore_adapter.metrics import latency_ms
from fedcore_adapter.zoo.datamodules import MNIST1DDataModule
from fedcore_adapter.zoo.models import MNIST1DCNN

from benchmarks.common import environment, markdown


def pruning_node(ratio: float) -> dict:
    return {"kind": "pruning", "pruning_ratio": ratio, "pruning_iterations": 3, "epochs": 5, "learning_rate": 1e-3,
            "importance": "MagnitudeImportance", "pruner_name": "magnitude_pruner", "importance_norm": 1,
            "finetune_params": {"epochs": 20, "custom_loss": None}}


def side_by_side_latency(models: dict, inputs: torch.Tensor, rounds: int, threads: int) -> dict[str, float]:
    """Median over rounds of each model's median batch latency; models interleaved within every round."""
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            per_round[name].append(statistics.median(latency_ms(model, inputs, torch.device("cpu"), warmup=3,
                                                                repeats=20, num_threads=threads)))
    return {name: statistics.median(v) for name, v in per_round.items()}


def run_seed(seed: int, ratios: list[float], rounds: int, out: str, threads: int) -> list[dict]:
    dm = MNIST1DDataModule(seed=seed)
    common = {"seed": seed, "num_threads": threads, "save_each": -1}
    raw = run_setup("RAW", MNIST1DCNN(), dm, output_dir=out, model_name=f"s{seed}", overrides={"common": common})
    base_row = raw.metrics[-1]
    rows = [{"seed": seed, "ratio": 0.0, **{k: base_row[k] for k in ("params", "macs", "size_mb", "accuracy")}}]
    models = {0.0: raw.model.eval()}
    for ratio in ratios:
        result = run_setup({"name": f"prune{ratio}", "common": common, "nodes": [pruning_node(ratio)]},
                           copy.deepcopy(raw.model), dm, output_dir=out, model_name=f"s{seed}")
        row = result.metrics[-1]
        rows.append({"seed": seed, "ratio": ratio, **{k: row[k] for k in ("params", "macs", "size_mb", "accuracy")},
                     "finetune_wall_s": row["wall_s"]})
        models[ratio] = result.model.eval()
    batch = next(iter(dm.test_dataloader()))[0]
    for size, key in ((batch.shape[0], "latency_ms"), (1, "latency_ms_b1")):
        lat = side_by_side_latency(models, batch[:size], rounds, threads)
        for row in rows:
            row[key] = lat[row["ratio"]]
    for row in rows:
        row["macs_x"] = rows[0]["macs"] / row["macs"]
        row["speedup"] = rows[0]["latency_ms"] / row["latency_ms"]
        row["speedup_b1"] = rows[0]["latency_ms_b1"] / row["latency_ms_b1"]
        row["acc_drop_pts"] = 100 * (rows[0]["accuracy"] - row["accuracy"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="threads for training, fine-tuning and latency")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for seed in args.seeds:
            rows += run_seed(seed, args.ratios, args.rounds, out, args.threads)
    print(environment())
    print(markdown(rows, ["seed", "ratio", "params", "macs", "macs_x", "size_mb", "accuracy", "acc_drop_pts",
                          "latency_ms", "speedup", "latency_ms_b1", "speedup_b1", "finetune_wall_s"]))


if __name__ == "__main__":
    main()
