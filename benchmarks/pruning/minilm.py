"""all-MiniLM-L6-v2 with 50% of attention heads and FFN channels removed: latency and embedding cosine.

    python -m benchmarks.pruning.minilm [--ratio 0.5] [--epochs 8] [--lr 2e-4] [--rounds 7] [--max-length 64]
        [--threads 1]

Sentences are real English prose (``zoo.text.english_sentences``): 256 to
distil on, 256 others to compare on, batch 32 x ``--max-length`` tokens (the
longest of these sentences is 60 tokens, so 64 truncates none; 128 is mostly
padding). Two setups run
through the engine on the pretrained encoder: ``pruning`` alone, and ``pruning``
whose final fine-tune is a short distillation on the unlabeled training
sentences (the shared training loop matches the original's last hidden states).
Mean/min cosine of the mean-pooled sentence embeddings to the original's are
over the 256 held-out sentences; latency is measured side by side in this
process (``metrics.latency_ms``, ``--threads`` threads, default 1 because
2-thread timings on a shared, loaded machine swing with the other processes;
median over interleaved rounds).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch

from fedcore_adapter import run_setup
from fedcore_adapter.metrics import latency_ms
from fedcore_adapter.zoo.text import TextDataModule, embedding_cosine, load_minilm

from benchmarks.common import environment, markdown

def side_by_side_latency(models: dict, inputs: dict, rounds: int, threads: int) -> dict[str, float]:
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            per_round[name].append(statistics.median(latency_ms(model, inputs, torch.device("cpu"), warmup=2,
                                                                repeats=5, num_threads=threads)))
    return {name: statistics.median(v) for name, v in per_round.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--importance", default="magnitude")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="threads for distillation and latency")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = TextDataModule(n_train=256, n_val=32, n_test=256, batch_size=32, max_length=args.max_length)
    original = load_minilm()
    prune = {"kind": "pruning", "pruning_ratio": args.ratio, "importance": args.importance}
    variants = {
        "pruned": prune,
        "pruned + distilled": {**prune, "finetune_params": {"epochs": args.epochs, "learning_rate": args.lr}},
    }
    common = {"seed": 0, "num_threads": args.threads, "latency_repeats": 5}
    models, rows = {"original": original}, [{"variant": "original"}]
    with tempfile.TemporaryDirectory() as out:
        for name, node in variants.items():
            result = run_setup({"name": name.replace(" ", ""), "common": common, "nodes": [node]},
                               copy.deepcopy(original), dm, output_dir=out)
            if len(rows) == 1:
                rows[0].update({k: result.metrics[0][k] for k in ("params", "macs", "size_mb")})
            row = result.metrics[-1]
            rows.append({"variant": name, **{k: row[k] for k in ("params", "macs", "size_mb")},
                         "node_wall_s": row["wall_s"]})
            models[name] = result.model.eval()
    layer = models["pruned"].encoder.layer[0]
    shape = (f"heads {layer.attention.self.num_attention_heads}/12 per layer, FFN "
             f"{layer.intermediate.dense.out_features}/1536, hidden {layer.output.dense.out_features}")
    batch = {k: v for k, v in next(iter(dm.test_dataloader())).items()}
    lat = side_by_side_latency(models, batch, args.rounds, args.threads)
    for row in rows:
        row["latency_ms"] = lat[row["variant"]]
        row["speedup"] = lat["original"] / lat[row["variant"]]
        row["macs_x"] = rows[0]["macs"] / row["macs"]
        cos = embedding_cosine(original, models[row["variant"]], dm.test_dataloader())
        row["mean_cosine"], row["min_cosine"] = cos["mean_cosine"], cos["min_cosine"]
    print(environment())
    print(f"ratio {args.ratio}, importance {args.importance}: {shape}; distillation {args.epochs} epochs, "
          f"lr {args.lr}, 256 train sentences; cosine over 256 held-out sentences; batch 32 x {args.max_length} tokens")
    print(markdown(rows, ["variant", "params", "macs", "macs_x", "size_mb", "latency_ms", "speedup", "mean_cosine",
                          "min_cosine", "node_wall_s"]))


if __name__ == "__main__":
    main()
