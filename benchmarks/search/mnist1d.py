"""The search on MNIST-1D from the default RAW model: best MACs reduction within 1 point, its latency ratio,
hypervolume against random search with the same trials, and the trial cost with and without the shared
prefix and early stopping (the same candidates run as whole chains).

    python -m benchmarks.search.mnist1d --out /tmp/search_bench [--trials 32] [--workers 2] [--full-chains 4]
                                        [--pretrained CHECKPOINT]

RAW (100 epochs) is trained once and cached under --raw; every search starts from it (``pretrained=``).
Each search is the ``fedcore-adapter search`` command (printed), TPE then random, one after the other.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import environment

ROOT = Path(__file__).resolve().parents[2]

# COMPOSITE_1 with fewer epochs per node (the machine is shared; the epochs are the same for every trial and
# both samplers): training 2 more epochs on RAW, pruning 2 iterations (1 epoch between, 3 after), low-rank 3.
CHAIN = ["nodes.0.epochs=5", "nodes.pruning.pruning_iterations=2", "nodes.pruning.epochs=1",
         "nodes.pruning.finetune_params.epochs=2", "nodes.low_rank.epochs=0", "nodes.low_rank.finetune_params.epochs=2",
         "common.limit_train_batches=10", "common.latency_repeats=10"]


def sh(cmd: list[str], log: Path) -> float:
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    print(f"  exit {code}, {wall:.0f} s (log {log})", flush=True)
    return wall


def raw_model(folder: Path) -> Path:
    final = folder / "RAW"
    if not (final / "final" / "manifest.json").exists():
        sh([sys.executable, "-m", "fedcore_adapter", "setup=raw", "tracking=none", f"output_dir={folder}"],
           folder.parent / "raw.log")
    return final


def read_trials(folder: Path) -> list[dict]:
    with open(folder / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in list(r.items()):
            try:
                r[k] = float(v) if v not in ("", None) and k not in ("chain", "state", "worker", "output_dir",
                                                                     "error", "feasible") else v
            except ValueError:
                pass
    return rows


def hv(rows: list[dict], ref_macs: float, line: float, column: str = "val_accuracy") -> float:
    """Hypervolume of the completed trials on (MACs / reference MACs, ``column``: the accuracy selected on)."""
    from fedcore_adapter.search.report import hypervolume

    pts = [[r["macs"] / ref_macs, r[column]] for r in rows
           if r["state"] == "complete" and isinstance(r.get("macs"), float) and isinstance(r.get(column), float)]
    return hypervolume(pts, ["minimize", "maximize"], [1.0, line])


def side_by_side_latency(best_dir: Path, ref_dir: Path, rounds: int = 7) -> tuple[float, float]:
    from fedcore_adapter import load_model
    from fedcore_adapter.metrics import latency_ms
    from fedcore_adapter.zoo.datamodules import MNIST1DDataModule
    from fedcore_adapter.zoo.models import MNIST1DCNN

    models = {"ref": load_model(ref_dir, MNIST1DCNN()), "best": load_model(best_dir, MNIST1DCNN())}
    x = next(iter(MNIST1DDataModule().test_dataloader()))[0]
    per = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            per[k].append(statistics.median(latency_ms(m, x, torch.device("cpu"), repeats=20, num_threads=1)))
    return statistics.median(per["ref"]), statistics.median(per["best"])


def full_chain_costs(search_dir: Path, raw: Path, rows: list[dict], k: int, out: Path) -> list[dict]:
    """The same candidates as whole chains from RAW (training node included), no early stopping, one by one."""
    from fedcore_adapter.building import run_from_config

    picks = [r for r in rows if r["state"] == "pruned"][: k // 2]
    picks += [r for r in rows if r["state"] == "complete"][: k - len(picks)]
    results = []
    for r in picks:
        n = int(r["trial"])
        nodes = json.loads((search_dir / "trials_nodes.json").read_text())[str(n)]
        cfg = {"setup": {"name": f"FULL_{n}", "nodes": nodes},
               "model": {"_target_": "fedcore_adapter.zoo.models.MNIST1DCNN"},
               "data": {"_target_": "fedcore_adapter.zoo.datamodules.MNIST1DDataModule"},
               "tracking": {"name": "none"}, "pretrained": str(raw), "output_dir": str(out),
               "common": {"limit_train_batches": 10, "latency_repeats": 10}}
        start = time.perf_counter()
        run_from_config(cfg)
        results.append({"trial": n, "state": r["state"], "search_wall_s": r["wall_s"],
                        "full_chain_wall_s": time.perf_counter() - start})
        print(f"  full chain of trial #{n} ({r['state']}): {results[-1]['full_chain_wall_s']:.1f} s "
              f"(in the search: {r['wall_s']:.1f} s)", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/search_bench")
    p.add_argument("--raw", default="/tmp/search_bench_raw")
    p.add_argument("--pretrained", default=None, help="a checkpoint to start from instead of RAW (100 epochs)")
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samplers", nargs="+", default=["tpe", "random"])
    p.add_argument("--full-chains", type=int, default=4)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = Path(args.pretrained) if args.pretrained else raw_model(Path(args.raw))
    summary = {"environment": environment(), "raw": str(raw), "runs": {}}
    for sampler in args.samplers:
        cmd = [sys.executable, "-m", "fedcore_adapter", "search", "setup=composite_1", f"pretrained={raw}",
               f"search.trials={args.trials}", "search.objectives=[macs,accuracy]", "search.max_accuracy_drop=0.01",
               f"search.sampler={sampler}", "cluster=local", f"cluster.n_workers={args.workers}", "tracking=none",
               f"model_name={sampler}", f"output_dir={out}", *CHAIN]
        wall = sh(cmd, out / f"search_{sampler}.log")
        folder = out / f"SEARCH_COMPOSITE_1_{sampler}"
        state = json.loads((folder / "search.json").read_text())
        ref = state["reference"]["row"]
        rows = read_trials(folder)
        on_val = state.get("selection", "validation") == "validation"
        line = (state["reference"]["val_accuracy"] if on_val else ref["accuracy"]) - 0.01
        feasible = [r for r in rows if r["state"] == "complete" and r["feasible"] == "True"]
        best = max(feasible, key=lambda r: r["macs_reduction"]) if feasible else None
        info = {"command": " ".join(cmd[2:]), "wall_s": wall, "reference": ref, "trials": len(rows),
                "complete": sum(r["state"] == "complete" for r in rows),
                "pruned": sum(r["state"] == "pruned" for r in rows),
                "failed": sum(r["state"] == "failed" for r in rows), "feasible": len(feasible),
                "selection": "validation" if on_val else "test",
                "hypervolume": hv(rows, ref["macs"], line, "val_accuracy" if on_val else "accuracy"), "best": best,
                "mean_trial_wall_s": statistics.mean(r["wall_s"] for r in rows if isinstance(r["wall_s"], float)),
                "prefix_wall_s": state["reference"].get("wall_s")}
        if best:
            r_lat, b_lat = side_by_side_latency(Path(best["output_dir"]) / "final",
                                                Path(state["reference"]["output_dir"]) / "final")
            info["latency_side_by_side_ms"] = {"reference": r_lat, "best": b_lat, "ratio": r_lat / b_lat}
        summary["runs"][sampler] = info
        print(json.dumps({k: v for k, v in info.items() if k != "best"}, indent=1, default=str), flush=True)
        print("best:", json.dumps(best, default=str), flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    first = args.samplers[0]
    folder = out / f"SEARCH_COMPOSITE_1_{first}"
    if args.full_chains:
        import optuna

        from fedcore_adapter.search.trial import open_storage

        study = optuna.load_study(study_name="search", storage=open_storage(folder / "study.journal"))
        (folder / "trials_nodes.json").write_text(json.dumps({str(t.number): t.user_attrs.get("nodes")
                                                              for t in study.trials if t.user_attrs.get("nodes")}))
        costs = full_chain_costs(folder, raw, read_trials(folder), args.full_chains, out / "full_chains")
        summary["full_chains"] = costs
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
