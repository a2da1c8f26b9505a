"""Candidate chains as GOLEM sees them, without GOLEM: the mapping between a chain graph's nodes and the search's
candidates, the two mutations (a chain move, a parameter change), and the penalised fitness
(``benchmarks.search.golem`` wraps them in GOLEM's types).

A chain is a list of node contents as GOLEM's ``OptNode`` holds them: ``{"name": <node id>, "params": {<node id>.
<field path>: value}}``; node ids and parameter names are the search space's (``pruning#1``, ``distillation+``,
``pruning#1.pruning_ratio``), so a chain is a candidate of the package's search: :func:`params` gives the parameters
``Search.submit`` runs (what ``SearchSpace.suggest`` reads from an Optuna trial).
"""
from __future__ import annotations

import json
import math
import random
from typing import Any, Mapping, Optional

from fedcore_adapter.search.space import Dimension, SearchSpace

Chain = list[dict]


def label(chain: Chain) -> str:
    return ">".join(node["name"] for node in chain)


def key(chain: Chain) -> str:
    """What identifies a candidate: its chain and every field's value."""
    return json.dumps([[n["name"], sorted(n["params"].items())] for n in chain], default=str)


def initial(space: SearchSpace) -> Chain:
    """The setup's chain as it defines it (the initial assumption): its nodes with their defined values."""
    return [{"name": tid, "params": space.defined(tid)} for tid in space.chains[space.initial]]


def params(space: SearchSpace, chain: Chain) -> dict[str, Any]:
    """The candidate's parameters as the search names them: ``chain`` (where the space has several) and each node's
    fields."""
    out: dict[str, Any] = {"chain": label(chain)} if len(space.chains) > 1 else {}
    for node in chain:
        out.update(node["params"])
    return out


def in_space(space: SearchSpace, chain: Chain) -> bool:
    """A chain of the space (one the package derived and validated) whose nodes hold exactly their fields, a
    categorical one among its choices (a number as the setup defines it may lie outside the range searched)."""
    if label(chain) not in space.chains:
        return False
    for node in chain:
        dims = {d.name: d for d in space.templates[node["name"]].dims}
        if set(node["params"]) != set(dims):
            return False
        if any(dims[k].type == "categorical" and v not in dims[k].choices for k, v in node["params"].items()):
            return False
    return True


def draw(dim: Dimension, rng: random.Random) -> Any:
    """A value of the dimension, uniform over its range (log-uniform for a log range; on its step) or choices."""
    if dim.type == "categorical":
        return rng.choice(list(dim.choices))
    low, high = dim.low, dim.high
    x = math.exp(rng.uniform(math.log(low), math.log(high))) if dim.log else rng.uniform(low, high)
    if dim.type == "int":
        step = int(dim.step or 1)
        return min(int(high), int(low) + step * round((x - low) / step))
    if dim.step:
        x = min(high, low + dim.step * round((x - low) / dim.step))
    return float(x)


def _drawn(space: SearchSpace, tid: str, rng: random.Random) -> dict:
    return {"name": tid, "params": {d.name: draw(d, rng) for d in space.templates[tid].dims}}


def move(space: SearchSpace, chain: Chain, rng: random.Random) -> Optional[Chain]:
    """One chain move (``SearchSpace.neighbours``: drop, insert, reorder, or undo one): the nodes the chain keeps
    keep their values, a node it gains gets values drawn; None when the chain has no neighbour."""
    options = space.neighbours(label(chain))
    if not options:
        return None
    kept = {node["name"]: node for node in chain}
    return [dict(kept[tid], params=dict(kept[tid]["params"])) if tid in kept else _drawn(space, tid, rng)
            for tid in space.chains[rng.choice(options)]]


def redraw(space: SearchSpace, chain: Chain, rng: random.Random, node_prob: Optional[float] = None
           ) -> Optional[Chain]:
    """The fields of some nodes drawn anew from their dimensions (FEDOT's parameter change mutation): each node with
    searchable fields is picked with probability ``node_prob`` (default 1 / their number; at least one is), and all
    its fields drawn; never the same chain back (drawn again). None when no node has a searchable field."""
    nodes = [i for i, node in enumerate(chain) if space.templates[node["name"]].dims]
    if not nodes:
        return None
    prob = 1.0 / len(nodes) if node_prob is None else node_prob
    for _ in range(100):
        picked = [i for i in nodes if rng.random() < prob] or [rng.choice(nodes)]
        out = [dict(node, params=dict(node["params"])) for node in chain]
        for i in picked:
            out[i] = _drawn(space, chain[i]["name"], rng)
        if key(out) != key(chain):
            return out
    return None


def fitness(row: Optional[Mapping[str, Any]], max_drop: Optional[float]) -> Optional[tuple[float, float]]:
    """GOLEM's fitness of a finished trial (its ``trials.csv`` row), both minimised: (MACs / the reference's,
    -validation accuracy). GOLEM has no constraint: a trial that misses it (or was stopped early) gets MACs
    ``1 + violation`` (validation accuracy points below the line, as a fraction), worse than any model that meets
    it, so every feasible trial dominates every infeasible one and infeasible ones rank by violation (Deb's
    constrained domination). None for a failed trial (GOLEM drops the individual)."""
    if not row or row.get("state") not in ("complete", "pruned"):
        return None
    acc, reduction = row.get("val_accuracy"), row.get("macs_reduction")
    if not isinstance(acc, (int, float)) or not isinstance(reduction, (int, float)) or reduction <= 0:
        return None
    ratio = 1.0 / reduction
    if max_drop is not None:
        drop = row.get("val_accuracy_drop_pt")
        violation = (drop / 100.0 - max_drop) if isinstance(drop, (int, float)) else 1.0
        if row["state"] == "pruned" or not row.get("feasible"):
            ratio = 1.0 + max(violation, 1e-9)
    return ratio, -float(acc)
