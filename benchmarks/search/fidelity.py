"""How much a stricter early stop would save, and which feasible trials it would lose: replays finished searches.

Each trial reports to the search's ``fidelity`` study the validation accuracy at the end of each node but the
last (the model the node hands on). This replays those reports under other margins below the constraint line
(stop at the first node end under ``line - margin``) and counts, per search: the trials stopped, the epochs they
would run (from where each trial started: after the shared prefix, or after a longer chain prefix an earlier trial
computed; the shared prefix counted once) against the epochs of the same candidates as whole chains (the shared
prefix included in each), and the trials that ended feasible but would have been stopped — with the best feasible
MACs reduction kept.

    python -m benchmarks.search.fidelity /tmp/search_full/SEARCH_COMPOSITE_1_tpe_s0 ... \
        [--margins 0.02 0.01 0 -0.005] [--node-epochs pruning=30 low_rank=30 distillation=3 ptq_static=0] \
        [--prefix-epochs 10]

``--node-epochs``: the validated epochs each node kind runs in these searches (COMPOSITE_1 at full budget:
pruning 30, low-rank 30, an inserted distillation 3, an inserted ptq_static 0); the script checks them against
every complete trial's recorded epochs and stops if they disagree.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import optuna

from fedcore_adapter.search.trial import open_storage


def node_kind(label: str) -> str:
    """``pruning#1`` -> ``pruning``, ``distillation+`` -> ``distillation``."""
    return label.split("#")[0].rstrip("+")


def replay(folder: Path, margins: list[float], node_epochs: dict[str, int], prefix_epochs: int) -> dict:
    """Per margin: trials stopped, epochs run vs whole chains, feasible trials lost, best feasible kept."""
    meta = json.loads((folder / "search.json").read_text())
    line = meta["reference"]["val_accuracy"] - meta["search"]["max_accuracy_drop"]
    study = optuna.load_study(study_name="fidelity", storage=open_storage(folder / "study.journal"))
    reports = {t.number: [v for _, v in sorted(t.intermediate_values.items())] for t in study.trials}
    rows = [r for r in csv.DictReader((folder / "trials.csv").open()) if r["state"] in ("complete", "pruned")
            and not r.get("same_as")]  # a repeat told an earlier trial's figures is not a trial (nor a saving)
    shared = min(int(r["start_node"]) for r in rows)  # the shared prefix's nodes: where the first trial started
    for row in rows:
        epochs = [node_epochs[node_kind(n)] for n in row["chain"].split(">")]
        row["start"] = int(row["start_node"]) - shared  # chain nodes a computed prefix spared this trial
        if row["state"] == "complete" and sum(epochs[row["start"]:]) != int(row["epochs"]):
            sys.exit(f"--node-epochs disagree with trial {row['trial']} of {folder.name}: {row['chain']} from "
                     f"node {row['start']} ran {row['epochs']} epochs, the table gives {sum(epochs[row['start']:])}")
        row["node_epochs"] = epochs
    best_all = max((float(r["macs_reduction"]) for r in rows if r["feasible"] == "True"), default=1.0)
    out = {"line": line, "best_feasible": best_all, "margins": {}}
    for margin in margins:
        run, whole, stopped = prefix_epochs, 0, 0  # the shared prefix ran once
        lost = []
        for row in rows:
            epochs, seen, start = row["node_epochs"], reports.get(int(row["trial"]), []), row["start"]
            whole += prefix_epochs + sum(epochs)
            spent, stop = 0, False
            for k, n in enumerate(epochs[start:]):  # reports: the node ends the trial ran, from its start
                spent += n
                if start + k < len(epochs) - 1 and k < len(seen) and seen[k] < line - margin:
                    stop = True
                    break
            if not stop and row["state"] == "pruned":  # stopped in the search at a node end not replayed here
                spent = int(row["epochs"])
            run += spent
            stopped += stop or row["state"] == "pruned"
            if stop and row["feasible"] == "True":
                lost.append({"trial": int(row["trial"]), "macs_reduction": round(float(row["macs_reduction"]), 1)})
        kept = max((float(r["macs_reduction"]) for r in rows if r["feasible"] == "True"
                    and int(r["trial"]) not in {x["trial"] for x in lost}), default=1.0)
        out["margins"][margin] = {"stopped": stopped, "epochs": run, "whole_chain_epochs": whole,
                                  "cheaper": round(whole / run, 2), "feasible_lost": lost,
                                  "best_feasible_kept": round(kept, 1),
                                  "started_past_prefix": sum(r["start"] > 0 for r in rows)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="SEARCH_* folders of finished searches")
    ap.add_argument("--margins", nargs="+", type=float, default=[0.02, 0.01, 0.0, -0.005])
    ap.add_argument("--node-epochs", nargs="+", default=["pruning=30", "low_rank=30", "distillation=3",
                                                          "ptq_static=0"])
    ap.add_argument("--prefix-epochs", type=int, default=10, help="the shared prefix's epochs (COMPOSITE_1: 10)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    node_epochs = {k: int(v) for k, v in (item.split("=") for item in args.node_epochs)}
    results = {}
    for folder in args.folders:
        results[folder.name] = res = replay(folder, args.margins, node_epochs, args.prefix_epochs)
        print(f"{folder.name}: line {res['line']:.4f}, best feasible {res['best_feasible']:.1f}x")
        for margin, m in res["margins"].items():
            lost = ", ".join(f"#{x['trial']} {x['macs_reduction']}x" for x in m["feasible_lost"]) or "none"
            print(f"  margin {margin:+.3f}: stopped {m['stopped']:2d}, epochs {m['epochs']} of "
                  f"{m['whole_chain_epochs']} ({m['cheaper']:.2f}x cheaper; {m['started_past_prefix']} trials "
                  f"started past the shared prefix), feasible lost: {lost}; "
                  f"best feasible kept {m['best_feasible_kept']}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
