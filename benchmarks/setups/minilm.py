"""Every named setup on the pretrained all-MiniLM-L6-v2, on unlabeled real sentences.

    python -m benchmarks.setups.minilm [--setups RAW TEST COMPOSITE_1 COMPOSITE_2 QAT_1 PTQ_1]
                                       [--limit-train-batches 1] [--rounds 5] [--learning-rate LR]

Each setup runs through ``jobs.run_from_config`` exactly as ``fedcore-adapter model=minilm
data=text setup=<NAME>`` would (its own chain and epochs; the text data has no labels, so every
training and fine-tuning step distils from the encoder as it entered the setup), with the batch
limits below so that an epoch is one batch of 8 sentences (the setups' own epoch counts, so
COMPOSITE_1 still takes ~150 optimizer steps). Afterwards every final model is reloaded from
its results folder onto a freshly loaded encoder (``load_model``), and compared side by side:
mean/min cosine of the mean-pooled sentence embeddings to the original's on 256 held-out
sentences, latency of one batch of 32 x 128 tokens with 2 threads (median over alternating
rounds), and checkpoint size. Ratios are original ÷ setup (higher = smaller / faster).
``--learning-rate`` overrides the learning rate of every training, pruning and low-rank node and of
their fine-tuning (``nodes.<kind>.learning_rate=`` and ``nodes.<kind>.finetune_params.learning_rate=``).
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
from fedcore_adapter.building import resolve_setup as load_setup
from fedcore_adapter.metrics import count_params, latency_ms
from fedcore_adapter.zoo.text import TextDataModule, embedding_cosine, load_minilm

from benchmarks.common import environment, markdown

MODEL = {"_target_": "fedcore_adapter.zoo.text.load_minilm"}
DATA = {"_target_": "fedcore_adapter.zoo.text.TextDataModule", "n_train": 256, "n_val": 64, "n_test": 256,
        "batch_size": 32, "max_length": 128}
RUN_BATCH = 8  # training / calibration batches inside the setups; comparisons use batches of 32


def learning_rate_overrides(setup: str, lr: float | None) -> dict:
    """Node overrides by kind setting ``lr`` on every node (and fine-tune) that trains."""
    if lr is None:
        return {}
    out = {}
    for node in load_setup(setup).nodes:
        if node.kind in ("training", "pruning", "low_rank"):
            rate = {"method": {"learning_rate": lr}} if node.kind == "low_rank" else {"learning_rate": lr}
            out[node.kind] = {**rate, **({"finetune_params": {"learning_rate": lr}}
                                         if getattr(node, "finetune_params", None) else {})}
    return out


def side_by_side_latency(models: dict, inputs: dict, rounds: int) -> dict[str, float]:
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            per_round[name].append(statistics.median(latency_ms(model, inputs, torch.device("cpu"), warmup=2,
                                                                repeats=5, num_threads=2)))
    return {name: statistics.median(v) for name, v in per_round.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setups", nargs="+", default=["RAW", "TEST", "COMPOSITE_1", "COMPOSITE_2", "QAT_1", "PTQ_1"])
    parser.add_argument("--limit-train-batches", type=int, default=1)
    parser.add_argument("--limit-valid-batches", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="/tmp/minilm_setups")
    parser.add_argument("--learning-rate", type=float, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    common = {"seed": 0, "num_threads": 2, "latency_repeats": 1, "latency_warmup": 1,
              "limit_train_batches": args.limit_train_batches, "limit_valid_batches": args.limit_valid_batches,
              "limit_test_batches": 1}
    runs = {}
    for name in args.setups:
        cfg = {"setup": name, "model": MODEL, "data": {**DATA, "batch_size": RUN_BATCH}, "tracking": {"name": "none"},
               "output_dir": args.out, "model_name": "minilm", "common": common,
               "nodes": learning_rate_overrides(name, args.learning_rate)}
        start = time.perf_counter()
        result = run_from_config(cfg)
        wall = time.perf_counter() - start
        runs[name] = {"folder": result.output_dir, "wall_s": wall, "final": result.metrics[-1],
                      "chain": " → ".join(r["kind"] for r in result.metrics[1:])}
        print(f"{name}: {wall:.0f} s ({runs[name]['chain']})", flush=True)
        del result
    original = load_minilm()
    dm = TextDataModule(**{k: v for k, v in DATA.items() if k != "_target_"})
    models = {"original": original, **{name: load_model(r["folder"], load_minilm()) for name, r in runs.items()}}
    inputs = next(iter(dm.test_dataloader()))
    latency = side_by_side_latency(models, inputs, args.rounds)
    input_size = json.loads((Path(next(iter(runs.values()))["folder"]) / "metrics.json").read_text())[0]["size_mb"]
    rows = [{"setup": "original (fp32)", "chain": "-", "params": count_params(original), "size_mb": input_size,
             "size_x": 1.0, "latency_ms": latency["original"], "speedup": 1.0, "mean_cosine": 1.0,
             "min_cosine": 1.0, "dtype": "float32", "wall_s": "-"}]
    for name, r in runs.items():
        cos = embedding_cosine(original, models[name], dm.test_dataloader())
        rows.append({"setup": name, "chain": r["chain"], "params": count_params(models[name]),
                     "size_mb": r["final"]["size_mb"], "size_x": input_size / r["final"]["size_mb"],
                     "latency_ms": latency[name], "speedup": latency["original"] / latency[name],
                     "mean_cosine": cos["mean_cosine"], "min_cosine": cos["min_cosine"],
                     "dtype": r["final"]["dtype"], "wall_s": round(r["wall_s"])})
    print(environment())
    print(markdown(rows, list(rows[0])))


if __name__ == "__main__":
    main()
