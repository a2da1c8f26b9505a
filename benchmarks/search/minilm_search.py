"""The search itself on all-MiniLM-L6-v2 without labels (``search.quality=cosine``): of a finished search's
complete trials at validation cosine >= the constraint line, each chain's fastest (by the search's own
measurement) reloaded from its trial's checkpoint and timed side by side with the original in interleaved rounds
(``benchmarks.timing.interleaved_latency``); the verdict: the fastest composite chain (two compression nodes or
more) against the fastest single method (one node), the median over rounds of the per-round ratio.

    HF_HUB_OFFLINE=1 fedcore-adapter search setup=<setup.yaml> model=minilm data=text ... \\
        search.quality=cosine search.max_accuracy_drop=0.02 search.objectives=[latency_ms,cosine] output_dir=<OUT>
    python -m benchmarks.search.minilm_search <OUT>/SEARCH_<SETUP>_minilm [--rounds 7] [--timing-batch 16]
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import torch

from fedcore_adapter import load_model
from fedcore_adapter.zoo.text import english_sentences, load_minilm, load_tokenizer

from ..timing import interleaved_latency


def feasible_trials(folder: Path) -> tuple[list[dict], float]:
    """The complete trials at or above the constraint line, and the line (reference val_cosine - the drop)."""
    state = json.loads((folder / "search.json").read_text())
    line = state["reference"]["val_cosine"] - state["search"]["max_accuracy_drop"]
    with open(folder / "trials.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["state"] == "complete" and not r["same_as"]]
    return [r for r in rows if float(r["val_cosine"]) >= line], line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the search's results folder")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--timing-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ok, line = feasible_trials(args.folder)
    best = {}  # per chain: its fastest trial at the line (the search's own latency measurement)
    for row in sorted(ok, key=lambda r: float(r["latency_ms"])):
        best.setdefault(row["chain"], row)
    models = {"fp32": load_minilm()}
    for chain, row in best.items():
        models[chain] = load_model(Path(row["output_dir"]) / "final", load_minilm()).eval()
    tok = load_tokenizer()
    batch = dict(tok(english_sentences(args.timing_batch, seed=1), padding="max_length", truncation=True,
                     max_length=128, return_tensors="pt"))
    timing = interleaved_latency({name: (lambda m=m: m(**batch)) for name, m in models.items()}, "fp32",
                                 rounds=args.rounds, per_round=args.per_round)
    chains = {chain: {"trial": int(row["trial"]), "val_cosine": float(row["val_cosine"]),
                      "test_cosine": float(row["cosine"]), "params": int(float(row["params"])),
                      "size_mb": float(row["size_mb"]), "latency_ms": timing[chain]["latency_ms"],
                      "speedup_over_fp32": timing[chain]["speedup"],
                      "speedup_range": [timing[chain]["speedup_min"], timing[chain]["speedup_max"]]}
              for chain, row in best.items()}
    out = {"line": line, "threads": args.threads, "rounds": args.rounds, "timing_batch": f"{args.timing_batch}x128",
           "fp32_latency_ms": timing["fp32"]["latency_ms"], "chains": chains}
    fastest = {family: min((c for c in chains if (">" in c) == (family == "composite")),
                           key=lambda c: timing[c]["latency_ms"], default=None) for family in ("composite", "single")}
    out["fastest"] = fastest
    if all(fastest.values()):
        ratios = [s / c for s, c in zip(timing[fastest["single"]]["times"], timing[fastest["composite"]]["times"])]
        out.update(composite_over_single=statistics.median(ratios), ratio_range=[min(ratios), max(ratios)])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
