"""How long a recovery a search trial's final distillation needs: runs that distillation (the chain's last node)
again, from the model the node before it handed on, for each of several lengths, and prints the validation and
test accuracy of each.

    python -m benchmarks.search.recovery SEARCH_FOLDER/trials/trial_0024 --epochs 3 10 20 40 [--out DIR]

The trial's own config is used (model, data, the distillation's fields and its teacher), only ``epochs`` changes;
each length is a trial run of one node through the search's ``run_trial`` (the one run-building path), so its
figures are measured as the search measures them. Written for the question whether the search's inserted
distillation should run longer than 3 epochs (benchmarks/RESULTS.md, *Search*).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import yaml

from fedcore_adapter.search.trial import run_trial


def distillation_input(trial: Path) -> tuple[dict, dict, Path]:
    """The trial's config, its final distillation node (as a one-node setup) and the checkpoint of the node
    before it."""
    cfg = yaml.safe_load((trial / "config.yaml").read_text())
    setup = cfg.pop("setup_resolved")
    nodes = setup["nodes"]
    last = len(nodes) - 1
    if nodes[last]["kind"] != "distillation":
        raise SystemExit(f"{trial}: its chain does not end in a distillation ({[n['kind'] for n in nodes]})")
    folders = sorted((trial / "nodes").iterdir(), key=lambda p: int(p.name.split("_", 1)[0]))
    before = folders[last]  # nodes/0_input is the trial's input: node i's input is folders[i]
    if not (before / "state.pt").exists():
        raise SystemExit(f"{before}: no checkpoint (the trial stopped before its distillation?)")
    return cfg, {**setup, "nodes": [nodes[last]]}, before


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trial", type=Path, help="a trial's results folder (SEARCH_.../trials/trial_<n>)")
    ap.add_argument("--epochs", type=int, nargs="+", default=[3, 10, 20, 40])
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = ap.parse_args(argv)
    cfg, setup, start = distillation_input(args.trial)
    node = setup["nodes"][0]
    teacher = node.get("teacher_checkpoint")
    if not teacher:
        raise SystemExit(f"{args.trial}: its distillation names no teacher_checkpoint (a search without a prefix)")
    out = args.out or Path(tempfile.mkdtemp(prefix="recovery_"))
    for epochs in args.epochs:
        one = copy.deepcopy(setup)
        one["nodes"][0]["epochs"] = epochs
        one["name"] = f"recovery_e{epochs}"
        began = time.perf_counter()
        facts = run_trial({"cfg": {**cfg, "pretrained": teacher, "output_dir": str(out)}, "setup": one,
                           "output_dir": str(out / f"e{epochs}"), "start": str(start)})
        row = facts["metrics"][-1]
        print(json.dumps({"epochs": epochs, "val_accuracy": facts.get("val_accuracy"), "accuracy": row["accuracy"],
                          "macs": row["macs"], "wall_s": round(time.perf_counter() - began, 1)}), flush=True)


if __name__ == "__main__":
    main()
