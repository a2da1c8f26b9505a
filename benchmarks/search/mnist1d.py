"""The search on MNIST-1D from the default RAW model: best MACs reduction within 1 point (selected on
validation, its test accuracy drop reported), its latency ratio, hypervolume against random search with the
same trials (median over seeds), the parallel efficiency of the trials on the workers against a pair of busy
loops measured in the same run, and the trial cost with and without the shared prefix and early stopping (the
same candidates run as whole chains).

    python -m benchmarks.search.mnist1d --out /tmp/search_bench [--budget cut|full] [--seeds 0 1 2]
        [--trials 32] [--workers 2] [--samplers tpe random] [--full-chains 4] [--chain-threads 1]
        [--pretrained CHECKPOINT] [--guided search.reuse=0.9 ...]
    python -m benchmarks.search.mnist1d --out DIR --raw RAW_DIR --budget full --full-chains-of SEARCH_DIR
        --full-chains 8

``--budget full``: COMPOSITE_1 exactly as setups/composite_1.yaml defines it (only ``common.latency_repeats=10``);
``cut``: its fine-tunes cut 5-10x (CHAIN below). RAW (100 epochs) is trained once and cached under --raw; every
search starts from it (``pretrained=``). Each search is the ``fedcore-adapter search`` command (printed), for each
seed every sampler one after the other, one folder per sampler and seed (``SEARCH_COMPOSITE_1_<sampler>_s<seed>``).
The random baseline runs with ``search.reuse=0`` (random search: every trial drawn whole); the other samplers with
the package's defaults and ``--guided`` overrides (a share of trials continues a feasible front trial's
computed prefix).
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
from typing import Callable, Optional

import torch

from benchmarks.common import environment

ROOT = Path(__file__).resolve().parents[2]

# COMPOSITE_1 with fewer epochs per node (the machine is shared; the epochs are the same for every trial and
# both samplers): training 2 more epochs on RAW, pruning 2 iterations (1 epoch between, 3 after), low-rank 3.
CHAIN = ["nodes.0.epochs=5", "nodes.pruning.pruning_iterations=2", "nodes.pruning.epochs=1",
         "nodes.pruning.finetune_params.epochs=2", "nodes.low_rank.method.epochs=0",
         "nodes.low_rank.finetune_params.epochs=2",
         "common.limit_train_batches=10", "common.latency_repeats=10"]
BUDGETS = {"cut": CHAIN, "full": ["common.latency_repeats=10"]}  # full: COMPOSITE_1 exactly as defined
# the whole chains of the cost comparison: the same common options as the search's trials
FULL_CHAIN_COMMON = {"cut": {"limit_train_batches": 10, "latency_repeats": 10}, "full": {"latency_repeats": 10}}

# one CPU-bound process on 1 thread (as each trial's worker): "matmul", a cache-resident matmul loop; "train",
# training steps of the search's own model (MNIST1DCNN, batch 128), whose memory traffic two processes share
BUSY = """
import sys, time, torch
torch.set_num_threads(1)
if sys.argv[2] == "train":
    from fedcore_adapter.zoo.models import MNIST1DCNN
    model, x, y = MNIST1DCNN(), torch.randn(128, 1, 40), torch.randint(0, 10, (128,))
    opt = torch.optim.Adam(model.parameters())
    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
else:
    a = torch.randn(192, 192)
    def step():
        global a
        a = torch.tanh(a @ a)
step()
print("ready", flush=True)
sys.stdin.readline()  # all copies start their loops together
start = time.perf_counter()
for _ in range(int(sys.argv[1])):
    step()
print(time.perf_counter() - start)
"""


def sh(cmd: list[str], log: Path, ok: tuple[int, ...] = (0,)) -> float:
    """Run ``cmd`` (output to ``log``); its wall time. An exit status not in ``ok`` stops the benchmark."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    print(f"  exit {code}, {wall:.0f} s (log {log})", flush=True)
    if code not in ok:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"{cmd[2:4]} failed (exit {code}): " + " | ".join(tail))
    return wall


def data_overrides(data: Optional[dict]) -> list[str]:
    """``--data`` as command-line overrides of the MNIST-1D data module (conf/data/mnist1d.yaml)."""
    return [f"data.{key}={value}" for key, value in dict(data or {}).items()]


def raw_model(folder: Path, data: Optional[dict] = None) -> Path:
    """RAW (100 epochs) trained once into ``folder``, on the data module with ``data`` (``--data``) changed."""
    final = folder / "RAW"
    if not (final / "final" / "manifest.json").exists():
        sh([sys.executable, "-m", "fedcore_adapter", "setup=raw", "tracking=none", f"output_dir={folder}",
            *data_overrides(data)], folder.parent / "raw.log")
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


def _busy(n: int, copies: int, kind: str = "matmul") -> list[float]:
    """Seconds each of ``copies`` busy-loop processes started at once took for its loop."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY, str(n), kind], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for _ in range(copies)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    return [float(proc.communicate()[0]) for proc in procs]


def busy_loops(rounds: int = 3, seconds: float = 2.0, kind: str = "matmul") -> dict:
    """The machine's effective parallelism for 2 processes: a busy loop alone vs two at once (alternating rounds);
    parallelism = t_alone / t_pair_1 + t_alone / t_pair_2 (2.0: two free cores; 1.0: one core shared)."""
    n = 5
    while _busy(n, 1, kind)[0] < seconds / 4:
        n *= 4
    n = int(n * seconds / _busy(n, 1, kind)[0])
    alone, pair = [], []
    for _ in range(rounds):
        alone.append(_busy(n, 1, kind)[0])
        pair.append(_busy(n, 2, kind))
    t1 = statistics.median(alone)
    parallelism = statistics.median(t1 / a + t1 / b for a, b in pair)
    return {"kind": kind, "iterations": n, "alone_s": alone, "pair_s": pair, "parallelism": parallelism}


def trial_efficiency(folder: Path, workers: int) -> dict:
    """Sum of the trials' walls (measured on the workers) / (the trial phase's wall x workers); the phase runs from
    the first trial's start to the last one's end (the study's timestamps; the shared prefix is before it)."""
    import optuna

    from fedcore_adapter.search.trial import open_storage

    study = optuna.load_study(study_name="search", storage=open_storage(folder / "study.journal"))
    done = [t for t in study.trials if t.datetime_start and t.datetime_complete and
            isinstance(t.user_attrs.get("wall_s"), (int, float))]
    if not done:
        return {}
    phase = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    busy = sum(t.user_attrs["wall_s"] for t in done)
    return {"trial_walls_s": busy, "trial_phase_s": phase, "efficiency": busy / (phase * workers) if phase else None}


def full_chain_costs(search_dir: Path, raw: Path, rows: list[dict], k: int, out: Path, common: dict,
                     threads: int = 1, data: Optional[dict] = None) -> list[dict]:
    """The same candidates as whole chains from RAW (training node included), no early stopping, one by one, on
    ``threads`` torch threads (1: as each trial's Dask worker, which had a core of its own while two ran at once)."""
    from fedcore_adapter.building import run_from_config
    from fedcore_adapter.metrics import fixed_threads

    pruned, complete = [r for r in rows if r["state"] == "pruned"], [r for r in rows if r["state"] == "complete"]
    picks = pruned[: k // 2] + complete[: k - k // 2]  # half stopped early, half complete ...
    picks += [r for r in pruned + complete if r not in picks][: k - len(picks)]  # ... or whichever there are
    results = []
    for r in picks:
        n = int(r["trial"])
        nodes = json.loads((search_dir / "trials_nodes.json").read_text())[str(n)]
        cfg = {"setup": {"name": f"FULL_{n}", "nodes": nodes},
               "model": {"_target_": "fedcore_adapter.zoo.models.MNIST1DCNN"},
               "data": {"_target_": "fedcore_adapter.zoo.datamodules.MNIST1DDataModule", **(data or {})},
               "tracking": {"name": "none"}, "pretrained": str(raw), "output_dir": str(out),
               "common": dict(common)}
        start = time.perf_counter()
        with fixed_threads(threads):
            run_from_config(cfg)
        results.append({"trial": n, "state": r["state"], "search_wall_s": r["wall_s"], "threads": threads,
                        "search_epochs": r.get("epochs"),
                        "full_chain_wall_s": time.perf_counter() - start})
        print(f"  full chain of trial #{n} ({r['state']}): {results[-1]['full_chain_wall_s']:.1f} s "
              f"(in the search: {r['wall_s']:.1f} s)", flush=True)
    return results


def one_search(args: argparse.Namespace, raw: Path, out: Path, sampler: str, seed: int) -> dict:
    label = f"{sampler}_s{seed}"
    cmd = [sys.executable, "-m", "fedcore_adapter", "search", "setup=composite_1", f"pretrained={raw}",
           f"search.trials={args.trials}", "search.objectives=[macs,accuracy]", "search.max_accuracy_drop=0.01",
           f"search.sampler={sampler}", f"search.seed={seed}", "cluster=local", f"cluster.n_workers={args.workers}",
           "tracking=none", f"model_name={label}", f"output_dir={out}", *BUDGETS[args.budget],
           *data_overrides(getattr(args, "data", None)),
           *(["search.reuse=0"] if sampler == "random" else getattr(args, "guided", []))]  # random: every trial drawn
    wall = sh(cmd, out / f"search_{label}.log", ok=(0, 1))  # 1: no trial met the constraint
    return search_figures(out / f"SEARCH_COMPOSITE_1_{label}", " ".join(cmd[2:]), sampler, seed, wall, args.workers)


def search_figures(folder: Path, command: str, sampler: str, seed: int, wall: float, workers: int) -> dict:
    """The figures of one finished search folder (selected on validation): trials complete / stopped / feasible,
    hypervolume, the best MACs reduction within the constraint with its test drop and latency side by side, the
    trials' walls and their parallel efficiency on ``workers``."""
    state = json.loads((folder / "search.json").read_text())
    ref = state["reference"]["row"]
    every = read_trials(folder)
    rows = [r for r in every if r.get("same_as") in ("", None)]  # a repeat told an earlier trial's figures: not run
    shared = min((r["start_node"] for r in rows), default=None)  # the shared prefix's end: where the first trial began
    on_val = state.get("selection", "validation") == "validation"
    line = (state["reference"]["val_accuracy"] if on_val else ref["accuracy"]) - 0.01
    feasible = [r for r in rows if r["state"] == "complete" and r["feasible"] == "True"]
    best = max(feasible, key=lambda r: r["macs_reduction"]) if feasible else None
    walls = [r["wall_s"] for r in rows if isinstance(r["wall_s"], float)]
    info = {"command": command, "folder": str(folder), "sampler": sampler, "seed": seed, "wall_s": wall,
            "reference": ref, "reference_val_accuracy": state["reference"].get("val_accuracy"),
            "selection": "validation" if on_val else "test", "trials": len(rows), "repeats": len(every) - len(rows),
            "continuations": sum(r.get("continues") not in ("", None) for r in rows),
            "started_past_prefix": sum(r.get("start_node") != shared for r in rows),
            "complete": sum(r["state"] == "complete" for r in rows),
            "pruned": sum(r["state"] == "pruned" for r in rows),
            "failed": sum(r["state"] == "failed" for r in rows), "feasible": len(feasible),
            "hypervolume": hv(rows, ref["macs"], line, "val_accuracy" if on_val else "accuracy"),
            "best_macs_reduction": best["macs_reduction"] if best else None,
            "best_val_accuracy_drop_pt": best.get("val_accuracy_drop_pt") if best else None,
            "best_test_accuracy_drop_pt": best.get("accuracy_drop_pt") if best else None, "best": best,
            "mean_trial_wall_s": statistics.mean(walls) if walls else None,
            "epochs": sum(r["epochs"] for r in rows if isinstance(r.get("epochs"), float)),
            "epochs_reused": sum(r["epochs_reused"] for r in rows if isinstance(r.get("epochs_reused"), float)),
            "prefix_wall_s": state["reference"].get("wall_s"), **trial_efficiency(folder, workers)}
    if best:
        r_lat, b_lat = side_by_side_latency(Path(best["output_dir"]) / "final",
                                            Path(state["reference"]["output_dir"]) / "final")
        info["latency_side_by_side_ms"] = {"reference": r_lat, "best": b_lat, "ratio": r_lat / b_lat}
    print(json.dumps({k: v for k, v in info.items() if k != "best"}, indent=1, default=str), flush=True)
    print("best:", json.dumps(best, default=str), flush=True)
    return info


def _median(values: list) -> Optional[float]:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def run_searches(summary: dict, args: argparse.Namespace, save: Callable[[], None],
                 search: Callable[[str, int], dict]) -> None:
    """Every seed's searches, one per sampler (``search(sampler, seed)``), each saved as it ends; then the busy-loop
    pair again and the per-sampler medians against the mean of the pair's parallelism before and after."""
    for seed in args.seeds:
        for sampler in args.samplers:
            summary["runs"].append(search(sampler, seed))
            save()
    summary["busy_loops_after"] = busy_loops()
    print("busy loops after:", json.dumps(summary["busy_loops_after"]), flush=True)
    parallelism = statistics.mean([summary["busy_loops_before"]["parallelism"],
                                   summary["busy_loops_after"]["parallelism"]])
    summary["busy_loop_parallelism"] = parallelism
    summary["per_sampler"] = per_sampler(summary["runs"], parallelism, args.workers)
    save()


def per_sampler(runs: list[dict], parallelism: Optional[float], workers: int) -> dict:
    """Per sampler, the median over seeds; a seed with no feasible trial counts 1.0x (no reduction) in the median
    of the best MACs reduction, and its hypervolume is 0."""
    out = {}
    for sampler in dict.fromkeys(r["sampler"] for r in runs):
        mine = [r for r in runs if r["sampler"] == sampler]
        eff = _median([r.get("efficiency") for r in mine])
        out[sampler] = {
            "seeds": [r["seed"] for r in mine],
            "hypervolume_median": _median([r["hypervolume"] for r in mine]),
            "hypervolume_per_seed": [r["hypervolume"] for r in mine],
            "best_macs_reduction_median": _median([r["best_macs_reduction"] or 1.0 for r in mine]),
            "best_macs_reduction_per_seed": [r["best_macs_reduction"] for r in mine],
            "best_test_accuracy_drop_pt_median": _median([r["best_test_accuracy_drop_pt"] for r in mine]),
            "best_test_accuracy_drop_pt_per_seed": [r["best_test_accuracy_drop_pt"] for r in mine],
            "best_val_accuracy_drop_pt_per_seed": [r["best_val_accuracy_drop_pt"] for r in mine],
            "feasible_per_seed": [r["feasible"] for r in mine],
            "wall_s_per_seed": [r["wall_s"] for r in mine],
            "trial_efficiency_median": eff,
            # the search's efficiency against what the machine gave two busy loops (1.0: as parallel as they were)
            "efficiency_vs_busy_loops": eff / (parallelism / workers) if eff and parallelism else None}
    return out


def whole_chain_comparison(folder: Path, raw: Path, args: argparse.Namespace, out: Path) -> dict:
    """The search's first ``--full-chains`` candidates (half stopped early, half complete) re-run as whole chains;
    how many times cheaper they were in the search (mean whole-chain wall / mean trial wall)."""
    import optuna

    from fedcore_adapter.search.trial import open_storage

    study = optuna.load_study(study_name="search", storage=open_storage(folder / "study.journal"))
    (folder / "trials_nodes.json").write_text(json.dumps({str(t.number): t.user_attrs.get("nodes")
                                                          for t in study.trials if t.user_attrs.get("nodes")}))
    costs = full_chain_costs(folder, raw, read_trials(folder), args.full_chains, out / "full_chains",
                             FULL_CHAIN_COMMON[args.budget], args.chain_threads, dict(args.data))
    result = {"full_chains": costs, "full_chain_threads": args.chain_threads}
    done = [c for c in costs if c.get("search_wall_s")]
    if done:
        result["full_chain_cost_ratio"] = (statistics.mean(c["full_chain_wall_s"] for c in done)
                                           / statistics.mean(c["search_wall_s"] for c in done))
    return result


def search_arguments(out: str, samplers: list[str], samplers_help: Optional[str] = None) -> argparse.ArgumentParser:
    """The options every search benchmark takes: where, from which RAW, at which budget, seeds, trials, workers."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=out)
    p.add_argument("--raw", default="/tmp/search_bench_raw")
    p.add_argument("--pretrained", default=None, help="a checkpoint to start from instead of RAW (100 epochs)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cut",
                   help="full: COMPOSITE_1 exactly as defined; cut: its fine-tunes cut 5-10x")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search.seed values (one search each)")
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samplers", nargs="+", default=samplers, help=samplers_help)
    p.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE", type=_data_option,
                   help="MNIST-1D data module options for RAW, every search and the whole chains (e.g. "
                        "num_samples=10000 val_fraction=0.25: a 2,000-sample validation split)")
    return p


def _data_option(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or key not in ("num_samples", "val_fraction", "seed"):
        raise argparse.ArgumentTypeError(f"--data takes num_samples=N, val_fraction=F or seed=S (got {text!r})")
    return key, float(value) if key == "val_fraction" else int(value)


def main() -> None:
    p = search_arguments("/tmp/search_bench", ["tpe", "random"])
    p.add_argument("--full-chains", type=int, default=4)
    p.add_argument("--guided", nargs="*", default=[], metavar="OVERRIDE",
                   help="search overrides for the samplers but random (e.g. search.reuse=0.9)")
    p.add_argument("--chain-threads", type=int, default=1,
                   help="torch threads of the whole chains (1: as each trial's worker)")
    p.add_argument("--parallelism-only", action="store_true",
                   help="only the two-process parallelism of the matmul and the training busy loops")
    p.add_argument("--full-chains-of", type=Path, default=None,
                   help="only the whole-chain comparison, for this finished SEARCH_* folder (written to --out)")
    args = p.parse_args()
    if args.parallelism_only:
        loops = {"environment": environment(), "load_average_start": os.getloadavg(),
                 "matmul": busy_loops(rounds=5), "train": busy_loops(rounds=5, kind="train"),
                 "load_average_end": os.getloadavg()}
        print(json.dumps(loops, indent=1))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    raw = Path(args.pretrained) if args.pretrained else raw_model(Path(args.raw), dict(args.data))
    if args.full_chains_of:
        result = {"environment": environment(), "load_average_start": os.getloadavg(),
                  "search": str(args.full_chains_of), **whole_chain_comparison(args.full_chains_of, raw, args, out),
                  "load_average_end": os.getloadavg()}
        (out / "full_chains.json").write_text(json.dumps(result, indent=1, default=str))
        print(json.dumps(result, indent=1, default=str))
        return
    summary = {"environment": environment(), "load_average_start": os.getloadavg(), "raw": str(raw),
               "budget": args.budget, "overrides": BUDGETS[args.budget], "data": dict(args.data), "seeds": args.seeds,
               "runs": []}

    def save() -> None:
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    summary["busy_loops_before"] = busy_loops()
    print("busy loops before:", json.dumps(summary["busy_loops_before"]), flush=True)
    summary["train_loops_before"] = busy_loops(kind="train")
    print("training loops before:", json.dumps(summary["train_loops_before"]), flush=True)
    save()
    run_searches(summary, args, save, lambda sampler, seed: one_search(args, raw, out, sampler, seed))
    if args.full_chains:
        summary.update(whole_chain_comparison(Path(summary["runs"][0]["folder"]), raw, args, out))
    summary["wall_s"] = time.time() - started
    summary["load_average_end"] = os.getloadavg()
    save()
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1, default=str))


if __name__ == "__main__":
    main()
