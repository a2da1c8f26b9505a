"""The GOLEM benchmark's chains (benchmarks/search/golem_chain.py, no GOLEM needed): the mapping between a chain
graph's nodes and the search's candidates, the two mutations, and the penalised fitness."""
from __future__ import annotations

import random

import optuna
import pytest

from benchmarks.search import golem_chain as gc
from fedcore_adapter.building import resolve_setup
from fedcore_adapter.search.config import SearchConfig
from fedcore_adapter.search.space import Dimension, derive_space


@pytest.fixture(scope="module")
def space():
    return derive_space(resolve_setup("composite_1"), SearchConfig.parse({}))


def _nodes_run(space, chain):
    """The nodes the package's search builds for the chain's parameters (an Optuna trial with them enqueued)."""
    study = optuna.create_study(directions=["minimize", "maximize"])
    study.enqueue_trial(gc.params(space, chain))
    label, nodes = space.suggest(study.ask())
    assert label == gc.label(chain)
    return nodes[len(space.prefix):]


def test_the_initial_chain_is_the_setups_chain_as_defined_and_runs_as_defined(space):
    chain = gc.initial(space)
    assert gc.label(chain) == "pruning#1>low_rank#2>pruning#3"
    assert chain[0]["params"] == {"pruning#1.importance": "magnitude", "pruning#1.pruning_ratio": 0.75,
                                  "pruning#1.reconstruct": False}
    assert gc.in_space(space, chain)
    ran = _nodes_run(space, chain)
    defined = space.setup.nodes[1:]
    assert [n["kind"] for n in ran] == [n.kind for n in defined]
    for node, setup_node in zip(ran, defined):
        if node["kind"] == "pruning":
            assert (node["pruning_ratio"], node["importance"]) == (setup_node.pruning_ratio, setup_node.importance)
        else:
            assert node["method"]["thresholds"] == setup_node.method.thresholds == [0.9]


def test_a_chain_move_keeps_the_kept_nodes_values_and_draws_a_gained_nodes(space):
    rng = random.Random(0)
    start = gc.initial(space)
    seen = set()
    for _ in range(60):
        moved = gc.move(space, start, rng)
        assert gc.label(moved) in space.neighbours(space.initial) and gc.in_space(space, moved)
        for node in moved:
            if node["name"] in gc.label(start).split(">"):
                assert node["params"] == next(n["params"] for n in start if n["name"] == node["name"])
            else:
                dims = space.templates[node["name"]].dims
                assert set(node["params"]) == {d.name for d in dims}
        seen.add(gc.label(moved))
    assert seen == set(space.neighbours(space.initial))  # every move is reachable
    back = gc.move(space, gc.move(space, start, random.Random(1)), random.Random(2))
    assert gc.in_space(space, back)


def test_a_parameter_change_draws_whole_nodes_anew_within_their_dimensions_and_runs_with_them(space):
    rng = random.Random(3)
    chain = gc.initial(space)
    dims = {d.name: d for t in space.templates.values() for d in t.dims}
    picked = []
    for _ in range(40):
        new = gc.redraw(space, chain, rng)
        assert gc.label(new) == gc.label(chain) and gc.key(new) != gc.key(chain)
        changed = {n["name"] for n, m in zip(chain, new) if n["params"] != m["params"]}
        picked.append(len(changed))
        for name, value in gc.params(space, new).items():
            if name != "chain":
                dim = dims[name]
                assert value in dim.choices if dim.type == "categorical" else dim.low <= value <= dim.high
        chain = new
    assert min(picked) >= 1 and max(picked) > 1  # one node at least; each with probability 1/3
    assert gc.redraw(space, chain, rng, node_prob=0.0) is not None  # none picked: one is
    ran = _nodes_run(space, chain)
    assert ran[0]["pruning_ratio"] == chain[0]["params"]["pruning#1.pruning_ratio"]
    assert ran[1]["method"]["thresholds"] == [chain[1]["params"]["low_rank#2.method.thresholds"]]


@pytest.mark.parametrize("dim, check", [
    (Dimension("x", "x", "float", 1e-4, 1e-1, log=True), lambda v: 1e-4 <= v <= 1e-1),
    (Dimension("x", "x", "int", 1, 10, step=3), lambda v: v in (1, 4, 7, 10)),
    (Dimension("x", "x", "float", 0.0, 1.0, step=0.25), lambda v: v in (0.0, 0.25, 0.5, 0.75, 1.0)),
    (Dimension("x", "x", "categorical", choices=("a", "b")), lambda v: v in ("a", "b")),
])
def test_draw_stays_in_the_dimension(dim, check):
    rng = random.Random(0)
    values = [gc.draw(dim, rng) for _ in range(200)]
    assert all(check(v) for v in values) and len(set(values)) > 1
    if dim.log:  # log-uniform: as many below the geometric middle as above
        assert 60 < sum(v < 10 ** -2.5 for v in values) < 140


def test_chains_outside_the_space_are_rejected(space):
    chain = gc.initial(space)
    assert not gc.in_space(space, chain[:1] + chain[:1])  # pruning#1 twice: not a chain of the space
    assert not gc.in_space(space, [chain[0], chain[2]][::-1])  # pruning#3>pruning#1: not derived
    missing = [dict(chain[0], params={"pruning#1.pruning_ratio": 0.5}), *chain[1:]]
    assert not gc.in_space(space, missing)
    bad = [dict(chain[0], params={**chain[0]["params"], "pruning#1.importance": "random"}), *chain[1:]]
    assert not gc.in_space(space, bad)


def _row(state, reduction, drop_pt, feasible, acc=None):
    return {"state": state, "macs_reduction": reduction, "val_accuracy_drop_pt": drop_pt, "feasible": feasible,
            "val_accuracy": 0.98 - drop_pt / 100 if acc is None else acc}


def test_fitness_penalises_a_missed_constraint_so_every_feasible_trial_dominates_every_infeasible_one():
    feasible = [_row("complete", r, d, True) for r, d in [(1.0, -0.5), (5.0, 0.5), (20.0, 1.0)]]
    infeasible = [_row("complete", 50.0, 1.25, False), _row("pruned", 30.0, 40.0, None),
                  _row("complete", 2.0, 3.0, False)]
    assert gc.fitness(feasible[1], 0.01) == pytest.approx((0.2, -0.975))
    assert gc.fitness(infeasible[0], 0.01) == pytest.approx((1.0025, -0.9675))  # 1 + 0.25 pt of violation
    f = [gc.fitness(r, 0.01) for r in feasible]
    i = [gc.fitness(r, 0.01) for r in infeasible]
    for a in f:
        for b in i:
            assert a[0] < b[0] and a[1] < b[1]
    by_violation = sorted(i)
    assert [v[0] for v in by_violation] == sorted(v[0] for v in i) and by_violation[0][1] < by_violation[-1][1]
    assert gc.fitness(infeasible[0], None) == pytest.approx((0.02, -0.9675))  # no constraint: as measured
    assert gc.fitness({"state": "failed"}, 0.01) is None and gc.fitness(None, 0.01) is None
    assert gc.fitness(_row("complete", None, 0.0, True), 0.01) is None
