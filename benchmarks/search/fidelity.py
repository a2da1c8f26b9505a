"""How much a stricter early stop would save, and which feasible trials it would lose: replays finished searches.

Each trial reports to the search's ``fidelity`` study the validation accuracy at the end of each node but the
last (the model the node hands on), and keeps every finished node's epoch curve there. This replays those
reports under other rules: margins below the constraint line (stop at the first node end under
``line - margin``) and, where the curves were kept, stopping inside nodes (``--within final_phase all``: the
search's ``early_stop.within_nodes`` modes, judged with the curves of the trials finished before each trial
started). It counts, per search and rule: the trials stopped, the epochs they would run (from where each trial
started: after the shared prefix, or after a longer chain prefix an earlier trial computed; the shared prefix
counted once) against the epochs of the same candidates as whole chains (the shared prefix included in each),
and the trials that ended feasible but would have been stopped — with the best feasible MACs reduction kept.
It does not model that the sampler would then propose other trials.

    python -m benchmarks.search.fidelity /tmp/search_full/SEARCH_COMPOSITE_1_tpe_s0 ... \
        [--margins 0.02 0.01 0 -0.005] [--within off final_phase all] [--min-curves 3] \
        [--node-epochs pruning=30 low_rank=30 distillation=3 ptq_static=0] [--prefix-epochs 10]

``--node-epochs``: the validated epochs each node kind runs in these searches (COMPOSITE_1 at full budget:
pruning 30, low-rank 30, an inserted distillation 3, an inserted ptq_static 0; a node whose ``epochs`` the search
drew, from an insert template's range or ``search.space.<kind>.epochs``, runs the trial's own figure); the script
checks them against every complete trial's recorded epochs (run and reused: ``epochs_reused``, trainings restored
from an identical earlier one) and stops if they disagree. The epochs counted as run are those the trials ran.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

import optuna

from fedcore_adapter.search.trial import judged_epochs, open_storage, recovery_gain, unrecoverable


def node_kind(label: str) -> str:
    """``pruning#1`` -> ``pruning``, ``distillation+`` -> ``distillation``."""
    return label.split("#")[0].rstrip("+")


def fidelity_twins(folder: Path) -> dict[int, Any]:
    """``{search trial number: its fidelity trial}``. Each fidelity trial names its search trial (``trial``);
    in studies from before that, the fidelity trials were asked one per trial that ran, in the same order (a
    repeat told or a rejected candidate asks none, so the two numberings part)."""
    storage = open_storage(folder / "study.journal")
    fid = optuna.load_study(study_name="fidelity", storage=storage).get_trials(deepcopy=False)
    named = {t.user_attrs["trial"]: t for t in fid if "trial" in t.user_attrs}
    if named or not fid:
        return named
    search = optuna.load_study(study_name="search", storage=storage).get_trials(deepcopy=False)
    ran = [t.number for t in search if "nodes" in t.user_attrs and "same_as" not in t.user_attrs
           and t.user_attrs.get("start_node", 0) < len(t.user_attrs["nodes"])]
    return dict(zip(ran, fid))


def replay_trial(twin: Any, earlier: list[dict], lower: float, mode: str, min_curves: int,
                 last_node: int, following: Optional[dict[int, tuple[str, int]]] = None,
                 recovered_by: tuple[str, ...] = ()) -> Optional[tuple[int, str]]:
    """``(epochs run, where)`` if ``mode`` and ``lower`` stop the trial (inside a node, or at a node end before
    its last, ``last_node``); None if it runs on as recorded. Needs the twin's curves. ``following``: per node of
    the trial's run, the kind and epochs of the node after it; a node end a kind in ``recovered_by`` follows is
    judged with the recovery such nodes showed (``recovery_gain``; not judged before), as the search judged it."""
    spent = 0
    for curve in twin.user_attrs.get("curves", []):
        values = curve["values"]
        gain = judged_epochs(earlier, curve["key"], mode, min_curves)
        for k in range(len(values)):
            if unrecoverable(values[:k + 1], gain, lower):
                wrong = " (it ends above)" if values[-1] >= lower and curve["node"] < last_node else ""
                return spent + k + 1, f"epoch {k + 1} of node {curve['node']}{wrong}"
        spent += len(values)
        if curve["node"] >= last_node or not values:
            continue
        kind, epochs = (following or {}).get(curve["node"], ("", 0))
        recovery = 0.0
        if kind in recovered_by:
            recovery = recovery_gain(earlier, kind, epochs, lower, min_curves)
            if recovery is None:
                continue
        if values[-1] + recovery < lower:
            return spent, f"end of node {curve['node']}"
    return None


def epochs_reused(row: dict) -> int:
    """A trial's epochs restored from identical earlier trainings: ``epochs_reused``, or in a search written
    before that column, the sum its nodes' notes give (``<tag>: N epochs reused ...``)."""
    if row.get("epochs_reused") not in (None, ""):
        return int(float(row["epochs_reused"]))
    metrics = Path(row.get("output_dir") or "") / "metrics.json"
    if not row.get("output_dir") or not metrics.is_file():
        return 0
    notes = " ".join(str(r.get("note") or "") for r in json.loads(metrics.read_text()))
    return sum(int(n) for n in re.findall(r"(\d+) epochs reused", notes))


def _drawn_epochs(row: dict, node: str, table: int) -> int:
    """A node's epochs: drawn by the search where its space held them (the trial's ``param:<node>.epochs``),
    else ``--node-epochs``'s figure for its kind."""
    drawn = row.get(f"param:{node}.epochs")
    return int(float(drawn)) if drawn not in (None, "") else table


def replay(folder: Path, margins: list[float], modes: list[str], node_epochs: dict[str, int], prefix_epochs: int,
           min_curves: int) -> dict:
    """Per rule (mode and margin): trials stopped, epochs run vs whole chains, feasible trials lost, best kept."""
    meta = json.loads((folder / "search.json").read_text())
    line = meta["reference"]["val_accuracy"] - meta["search"]["max_accuracy_drop"]
    recovered_by = tuple(meta["search"].get("early_stop", {}).get("recovered_by", ()))  # as the search judged
    twins = fidelity_twins(folder)
    rows = [r for r in csv.DictReader((folder / "trials.csv").open()) if r["state"] in ("complete", "pruned")
            and not r.get("same_as")]  # a repeat told an earlier trial's figures is not a trial (nor a saving)
    shared = min(int(r["start_node"]) for r in rows)  # the shared prefix's nodes: where the first trial started
    for row in rows:
        epochs = [_drawn_epochs(row, n, node_epochs[node_kind(n)]) for n in row["chain"].split(">")]
        row["start"] = int(row["start_node"]) - shared  # chain nodes a computed prefix spared this trial
        reused = epochs_reused(row)  # restored from an identical earlier training, not run
        if row["state"] == "complete" and sum(epochs[row["start"]:]) != int(row["epochs"]) + reused:
            sys.exit(f"--node-epochs disagree with trial {row['trial']} of {folder.name}: {row['chain']} from "
                     f"node {row['start']} ran {row['epochs']} epochs (and reused {reused}), the table gives "
                     f"{sum(epochs[row['start']:])}")
        row["node_epochs"] = epochs
        row["twin"] = twins.get(int(row["trial"]))
        row["last"] = len(epochs) - 1 - row["start"]  # the last node's index in the trial's run
        labels = row["chain"].split(">")  # per node of the trial's run: the kind and epochs of the node after it
        row["following"] = {i - row["start"]: (node_kind(labels[i + 1]), epochs[i + 1])
                            for i in range(row["start"], len(labels) - 1)}
    curves = any(r["twin"] is not None and "curves" in r["twin"].user_attrs for r in rows)  # kept (new studies)
    finished = [t for t in twins.values() if t.datetime_complete is not None]
    for row in rows:  # what the trial could judge by: the curves of the trials finished before it started
        row["earlier"] = [] if row["twin"] is None else [
            c for t in finished if t.datetime_complete < row["twin"].datetime_start
            for c in t.user_attrs.get("curves", [])]
    best_all = max((float(r["macs_reduction"]) for r in rows if r["feasible"] == "True"), default=1.0)
    out = {"line": line, "best_feasible": best_all, "curves": curves, "rules": {}}
    for mode in modes if curves else ["off"]:
        for margin in margins:
            run, whole, stopped, lost, wrong = prefix_epochs, 0, 0, [], []  # the shared prefix ran once
            for row in rows:
                whole += prefix_epochs + sum(row["node_epochs"])
                twin, stop = row["twin"], None
                if curves and twin is None:  # it ran no node (a computed prefix was its whole chain)
                    spent = int(row["epochs"] or 0)
                elif curves:  # a twin without curves ran only nodes without epochs
                    stop = replay_trial(twin, row["earlier"], line - margin, mode, min_curves, row["last"],
                                        row["following"], recovered_by)
                    spent = stop[0] if stop else int(row["epochs"])
                else:
                    seen = [v for _, v in sorted(twin.intermediate_values.items())] if twin else []
                    spent, epochs = 0, row["node_epochs"][row["start"]:]
                    for k, n in enumerate(epochs):  # reports: the node ends the trial ran, from its start
                        spent += n
                        if k < len(epochs) - 1 and k < len(seen) and seen[k] < line - margin:
                            stop = (spent, f"end of node {k}")
                            break
                    if stop is None and row["state"] == "pruned":  # stopped in the search, not replayed here
                        spent = int(row["epochs"])
                run += spent
                stopped += stop is not None or row["state"] == "pruned"
                if stop and "(it ends above)" in stop[1]:  # a node the node-end rule lets on: a wrong stop
                    wrong.append({"trial": int(row["trial"]), "at": stop[1]})
                if stop and row["feasible"] == "True":
                    lost.append({"trial": int(row["trial"]), "macs_reduction": round(float(row["macs_reduction"]), 1),
                                 "at": stop[1]})
            kept = max((float(r["macs_reduction"]) for r in rows if r["feasible"] == "True"
                        and int(r["trial"]) not in {x["trial"] for x in lost}), default=1.0)
            out["rules"][f"{mode} {margin:+.3f}"] = {
                "stopped": stopped, "epochs": run, "whole_chain_epochs": whole, "cheaper": round(whole / run, 2),
                "feasible_lost": lost, "best_feasible_kept": round(kept, 1), "stopped_above": wrong,
                "started_past_prefix": sum(r["start"] > 0 for r in rows)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="SEARCH_* folders of finished searches")
    ap.add_argument("--margins", nargs="+", type=float, default=[0.02, 0.01, 0.0, -0.005])
    modes = ["off", "final_phase", "phase_ends", "all"]
    ap.add_argument("--within", nargs="+", default=modes, choices=modes,
                    help="early_stop.within_nodes modes (needs the curves)")
    ap.add_argument("--min-curves", type=int, default=3, help="early_stop.min_curves")
    ap.add_argument("--node-epochs", nargs="+", default=["pruning=30", "low_rank=30", "distillation=3",
                                                          "ptq_static=0"])
    ap.add_argument("--prefix-epochs", type=int, default=10, help="the shared prefix's epochs (COMPOSITE_1: 10)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    node_epochs = {k: int(v) for k, v in (item.split("=") for item in args.node_epochs)}
    results = {}
    for folder in args.folders:
        results[folder.name] = res = replay(folder, args.margins, args.within, node_epochs, args.prefix_epochs,
                                            args.min_curves)
        print(f"{folder.name}: line {res['line']:.4f}, best feasible {res['best_feasible']:.1f}x"
              f"{'' if res['curves'] else ' (no curves kept: node ends only)'}")
        for rule, m in res["rules"].items():
            lost = ", ".join(f"#{x['trial']} {x['macs_reduction']}x ({x['at']})" for x in m["feasible_lost"]) \
                or "none"
            print(f"  {rule}: stopped {m['stopped']:2d}, epochs {m['epochs']} of {m['whole_chain_epochs']} "
                  f"({m['cheaper']:.2f}x cheaper; {m['started_past_prefix']} trials started past the shared "
                  f"prefix), feasible lost: {lost}; best feasible kept {m['best_feasible_kept']}x; nodes stopped "
                  f"inside that end above the line less margin (not the last): {len(m['stopped_above'])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
