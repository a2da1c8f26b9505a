"""GOLEM against Optuna on the MNIST-1D search benchmark: GOLEM's own evolutionary optimiser (``EvoGraphOptimizer``,
multi-objective) proposes the candidates of the package's search, which runs them as it runs Optuna's.

Needs ``thegolem`` (0.5.0: numpy<2, scipy<1.13 on Python 3.11), so it runs in a venv of its own, never the project's:

    python3 -m venv /work/golem-venv
    /work/golem-venv/bin/pip install -e . thegolem 'torch==2.13.0'
    /work/golem-venv/bin/python -m benchmarks.search.golem --out /tmp/golem_bench --raw RAW_DIR --budget full \\
        --seeds 0 1 2 --trials 32 --workers 2 [--samplers golem tpe random] [--pop-size 8]

What is the same as the Optuna searches (``benchmarks.search.mnist1d``): the command's config (the ``fedcore-adapter
search`` overrides, composed by the same Hydra app), the space (``search.space.derive_space`` on COMPOSITE_1), and
every evaluation: a trial asked of the search with GOLEM's candidate as its parameters (``Search.submit``, through
``study.enqueue_trial``), run by ``search.trial.run_trial`` on the package's Dask workers from the shared prefix (or
the longest prefix already computed), stopped early at node ends, measured by ``metrics.measure``, selected on the
validation split, told and written to ``trials.csv`` by the driver; the figures are ``mnist1d.search_figures``'.

GOLEM's side:
- the initial graph is COMPOSITE_1's chain after its shared training node, each node holding its fields as the
  setup defines them (the seed's ``need_evo_opt`` start point); a graph node is a node of the chain
  (``{"name": "pruning#1", "params": {"pruning#1.pruning_ratio": 0.75, ...}}``, ``golem_chain``);
- two mutations: a chain move (``SearchSpace.neighbours``: drop, insert, reorder, or undo one; kept nodes keep
  their values, a gained node draws them) and a parameter change (FEDOT's: each node picked with GOLEM's per-node
  probability, 1 / chain length at its default strength, gets all its fields drawn anew from their ``Dimension``s
  of the package's space); GOLEM's own one-point crossover on the chain graphs too; GOLEM's verifier keeps only
  chains of the space (``golem_chain.in_space``: the chains the package derived and validated);
- objectives (both minimised): MACs / the reference's, and -validation accuracy.

Where GOLEM's API forces a simplification:
- **constraint**: GOLEM has no constraint handling for fitness values (its verifier rules judge graphs before they
  run); the <= 1 pt constraint is a penalty: a trial below the line, or stopped early, gets MACs ``1 + violation``
  (``golem_chain.fitness``), so every feasible trial dominates every infeasible one (Deb's rule);
- **parallelism**: GOLEM evaluates a generation at a time (``n_jobs``: joblib, here on threads), so 2 evaluations
  are in flight only within a generation; at its end a worker waits for the generation's last trial (Optuna's loop
  asks a new trial whenever a worker is free). The threads only wait: the trials run on the package's Dask workers;
- **budget**: GOLEM counts generations, not evaluations; a stop condition ends it once ``search.trials`` trials
  have finished, and a candidate asked past the budget is not run (GOLEM drops it). A candidate already run (the
  same chain and values) is not run again: it gets its row again;
- **lost workers**: ``search.retries=0``: a trial whose worker is lost fails (the driver's re-run would be asked
  in place of GOLEM's next candidate).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import environment
from benchmarks.search import golem_chain
from benchmarks.search.mnist1d import (BUDGETS, busy_loops, data_overrides, one_search, raw_model, run_searches,
                                       search_arguments, search_figures, sh)

POP_SIZE = 8


def _graph(chain: golem_chain.Chain) -> Any:
    from golem.core.optimisers.graph import OptGraph, OptNode

    nodes: list = []
    for content in chain:
        nodes.append(OptNode({"name": content["name"], "params": dict(content["params"])}, nodes_from=nodes[-1:]))
    return OptGraph(nodes[-1:])


def _chain(graph: Any) -> Optional[golem_chain.Chain]:
    """The graph's nodes from first to last; None for a graph that is not a chain."""
    roots = graph.root_nodes()
    if len(roots) != 1:
        return None
    out, node = [], roots[0]
    while node is not None:
        if len(node.nodes_from) > 1:
            return None
        out.append({"name": node.content["name"], "params": dict(node.content.get("params") or {})})
        node = node.nodes_from[0] if node.nodes_from else None
    return out[::-1] if len(out) == len(graph.nodes) else None


class Evaluations:
    """GOLEM's objective, called from its evaluation threads, as the search's trials (``Search.submit`` with the
    candidate's parameters, ``Search.collect``); a candidate already run or running is not run again; past the
    budget nothing runs (no fitness: GOLEM drops the individual)."""

    def __init__(self, search: Any, pool: Any):
        self.search, self.pool = search, pool
        self.lock = threading.Lock()
        self.known: dict[str, Optional[dict]] = {}  # candidate key -> its row
        self.pending: dict[str, int] = {}  # candidate key -> trial number in flight
        self.asked = 0  # objective calls GOLEM made (rows reused and past the budget included)

    def spent(self) -> bool:
        return not self.search.remaining and not self.search.in_flight

    def fitness(self, chain: Optional[golem_chain.Chain], first: bool = False) -> tuple[float, float]:
        """(MACs ratio, -validation accuracy) of the chain's trial; ``first``: GOLEM's first metric call of it."""
        self.asked += first
        row = self._row(chain, golem_chain.key(chain)) if chain is not None else None
        value = golem_chain.fitness(row, self.search.scfg.max_accuracy_drop)
        if value is None:
            raise ValueError("no trial: failed, or past the budget")  # GOLEM's Objective: a null fitness
        return value

    def _row(self, chain: golem_chain.Chain, key: str) -> Optional[dict]:
        with self.lock:
            if key in self.known:
                return self.known[key]
            if key not in self.pending:
                if not self.search.remaining:
                    return None
                number = self.search.submit(self.pool, golem_chain.params(self.search.space, chain))
                if number not in self.search.in_flight:  # not a valid setup: failed at once
                    self.known[key] = self.search.row(number)
                    return self.known[key]
                self.pending[key] = number
        while True:
            with self.lock:
                if key in self.known:
                    return self.known[key]
                for number, row in self.search.collect(self.pool, timeout=1.0):
                    done = next((k for k, n in self.pending.items() if n == number), None)
                    if done is not None:  # not a twin the search told (GOLEM's candidates are distinct)
                        del self.pending[done]
                        self.known[done] = row
            time.sleep(0.01)  # the other evaluation thread's turn


def golem_loop(pop_size: int) -> Any:
    """The search's loop (``run_search(..., loop=)``): GOLEM's EvoGraphOptimizer from the setup's chain."""

    def loop(search: Any, pool: Any) -> None:
        from joblib import parallel_config

        from golem.core.dag.verification_rules import has_no_cycle, has_one_root
        from golem.core.optimisers.genetic.gp_optimizer import EvoGraphOptimizer
        from golem.core.optimisers.genetic.operators.base_mutations import MutationStrengthEnum, get_mutation_prob
        from golem.core.optimisers.genetic.gp_params import GPAlgorithmParameters
        from golem.core.optimisers.objective import Objective
        from golem.core.optimisers.optimization_parameters import GraphRequirements
        from golem.core.optimisers.optimizer import GraphGenerationParams

        space, seed = search.space, search.scfg.seed
        rng = random.Random(seed)
        evaluations = Evaluations(search, pool)

        def chain_move(graph: Any, **_: Any) -> Any:
            chain = _chain(graph)
            moved = golem_chain.move(space, chain, rng) if chain is not None else None
            return _graph(moved) if moved is not None else graph

        def parameter_change(graph: Any, parameters: Any = None, **_: Any) -> Any:
            chain = _chain(graph)
            strength = getattr(parameters, "mutation_strength", MutationStrengthEnum.mean)  # GOLEM's per-node
            prob = get_mutation_prob(strength, graph.root_nodes()[0]) if chain else None  # probability (1/n)
            drawn = golem_chain.redraw(space, chain, rng, prob) if chain is not None else None
            return _graph(drawn) if drawn is not None else graph

        def in_space(graph: Any) -> bool:
            chain = _chain(graph)
            return chain is not None and golem_chain.in_space(space, chain)

        objective = Objective({"macs_ratio": lambda g: evaluations.fitness(_chain(g), first=True)[0],
                               "neg_val_accuracy": lambda g: evaluations.fitness(_chain(g))[1]},
                              is_multi_objective=True)
        requirements = GraphRequirements(
            num_of_generations=search.scfg.trials, timeout=None, early_stopping_iterations=None,
            early_stopping_timeout=None, n_jobs=pool.slots, show_progress=False, keep_history=True,
            history_dir=str(search.folder / "golem"), max_depth=len(max(space.chains.values(), key=len)))
        params = GPAlgorithmParameters(multi_objective=True, pop_size=pop_size, max_pop_size=pop_size,
                                       mutation_types=[chain_move, parameter_change])
        params.seed = seed
        generation = GraphGenerationParams(rules_for_constraint=[has_one_root, has_no_cycle, in_space],
                                           available_node_types=list(space.templates))
        optimiser = EvoGraphOptimizer(objective, [_graph(golem_chain.initial(space))], requirements, generation,
                                      params)
        optimiser.stop_optimization.add_condition(evaluations.spent, f"{search.scfg.trials} trials finished")
        with parallel_config(backend="threading"):  # GOLEM's n_jobs: the objective's waits, in this process
            optimiser.optimise(objective)
        search.state["golem"] = {"generations": optimiser.current_generation_num, "objective_calls":
                                 evaluations.asked, "pop_size": pop_size, "seed": seed,
                                 "trials_not_run": search.remaining}
        print(f"GOLEM: {optimiser.current_generation_num} generations, {evaluations.asked} objective calls, "
              f"{search.remaining} trials of the budget not run", flush=True)

    return loop


def _search_task(pop_size: int) -> Any:
    def task(cfg: Any) -> None:
        from fedcore_adapter.entrypoints.common import plain, reporting_errors
        from fedcore_adapter.search.driver import run_search

        logging.getLogger("fedcore_adapter").setLevel(logging.INFO)
        plain_cfg = plain(cfg)
        result = reporting_errors(plain_cfg, lambda: run_search(plain_cfg, model_label=plain_cfg["model_name"],
                                                                loop=golem_loop(pop_size)))
        print(result.message)
        print(f"results: {result.folder}")
        if not result.feasible:
            sys.exit(1)

    return task


def golem_search(args: argparse.Namespace, raw: Path, out: Path, seed: int) -> dict:
    """One GOLEM search: the Optuna search's command line with GOLEM's loop, in a process of its own."""
    label = f"golem_s{seed}"
    overrides = ["setup=composite_1", f"pretrained={raw}", f"search.trials={args.trials}",
                 "search.objectives=[macs,accuracy]", "search.max_accuracy_drop=0.01", f"search.seed={seed}",
                 "search.retries=0", "cluster=local", f"cluster.n_workers={args.workers}", "tracking=none",
                 f"model_name={label}", f"output_dir={out}", *BUDGETS[args.budget], *data_overrides(args.data)]
    cmd = [sys.executable, "-m", "benchmarks.search.golem", "--run-search", f"--pop-size={args.pop_size}", "--",
           *overrides]
    wall = sh(cmd, out / f"search_{label}.log", ok=(0, 1))  # 1: no trial met the constraint
    folder = out / f"SEARCH_COMPOSITE_1_{label}"
    info = search_figures(folder, " ".join(cmd[2:]), "golem", seed, wall, args.workers)
    info["golem"] = json.loads((folder / "search.json").read_text()).get("golem")
    return info


def main() -> None:
    p = search_arguments("/tmp/golem_bench", ["golem"],
                         "golem, and Optuna samplers (tpe, random) to run beside it, seed by seed")
    p.add_argument("--pop-size", type=int, default=POP_SIZE, help="GOLEM's population (fixed)")
    p.add_argument("--run-search", action="store_true", help=argparse.SUPPRESS)  # one search: Hydra overrides follow
    args, rest = p.parse_known_args()
    if args.run_search:
        from fedcore_adapter.composition import run_hydra_app

        run_hydra_app(_search_task(args.pop_size), "search", [a for a in rest if a != "--"])
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    raw = Path(args.pretrained) if args.pretrained else raw_model(Path(args.raw), dict(args.data))
    summary = {"environment": environment(), "load_average_start": os.getloadavg(), "raw": str(raw),
               "budget": args.budget, "overrides": BUDGETS[args.budget], "seeds": args.seeds,
               "pop_size": args.pop_size, "runs": []}

    def save() -> None:
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    summary["busy_loops_before"] = busy_loops()
    print("busy loops before:", json.dumps(summary["busy_loops_before"]), flush=True)
    save()
    run_searches(summary, args, save, lambda sampler, seed: golem_search(args, raw, out, seed) if sampler == "golem"
                 else one_search(args, raw, out, sampler, seed))
    summary["wall_s"] = time.time() - started
    summary["load_average_end"] = os.getloadavg()
    save()
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1, default=str))


if __name__ == "__main__":
    main()
