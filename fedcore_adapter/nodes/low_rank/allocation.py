"""Rank allocators: every layer's rank chosen together, for the whole model.

- :func:`allocate` (svd with a ``budget``): the ranks that bring the model to a params or MACs target
  with the least spectral energy lost;
- :func:`allocate_nsr` (falor, ``allocation: global``): the fewest parameters with the sum of the
  measured per-layer losses under a bound;
- :func:`allocate_to_saving` (falor with a ``budget``): a target saving with the least summed loss.

:func:`budget_total` reads a :class:`.budget.Budget` as (current total, target total) of a model.

Energy budget (:func:`allocate`), greedy on marginal value: every layer starts at its cheapest option (rank 1,
or left as it is when no rank saves); the step with the most energy regained
per unit of cost (params or MACs) is taken while it fits. A layer's steps are
rank r -> r + 1 while a factorisation still saves, then "keep the layer as it
is" (no energy lost). Energy lost is relative per layer: sum of sigma_i^2
beyond the rank over the layer's sum of sigma_i^2.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ...metrics import count_macs, count_params
from .budget import Budget
from .falor import FalorResult
from .targets import Target

KEEP = None  # the "leave this layer as it is" choice


class BudgetError(ValueError):
    """No choice of ranks can meet the budget; the message says the smallest reachable total."""


@dataclass
class LayerSpectrum:
    target: Target
    s: torch.Tensor  # singular values, descending


def cost(t: Target, metric: str, rank: Optional[int]) -> int:
    """``t``'s params or MACs (``metric``) at ``rank``, or as it is (``KEEP``)."""
    if metric == "params":
        return t.params if rank is KEEP else t.params_at(rank)
    return t.macs if rank is KEEP else t.macs_at(rank)


def budget_total(budget: Budget, model: nn.Module, inputs: Any) -> tuple[int, float]:
    """``(current total, target total)`` of ``model``'s params or MACs (``inputs``: one calibration batch)."""
    total = count_params(model) if budget.metric == "params" else count_macs(model, inputs)
    return total, budget.value if budget.value is not None else budget.ratio * total


def minimum_total(targets: list[Target], model_total: int, metric: str) -> int:
    """The smallest model total reachable (every layer at its cheapest option); needs no spectrum."""
    total = model_total
    for t in targets:
        cheapest = min(cost(t, metric, KEEP), cost(t, metric, 1)) if t.largest_saving_rank() >= 1 \
            else cost(t, metric, KEEP)
        total -= cost(t, metric, KEEP) - cheapest
    return total


def allocate(layers: list[LayerSpectrum], model_total: int, target_total: float,
             metric: str) -> dict[str, Optional[int]]:
    """``name -> rank`` (or ``None``: keep as is) meeting ``target_total``; :class:`BudgetError` if impossible."""
    floor = minimum_total([layer.target for layer in layers], model_total, metric)
    if floor > target_total:
        raise BudgetError(f"the smallest model reachable has {floor} {metric} "
                          f"({floor / model_total:.3f} of the current {model_total}); "
                          f"the target {int(target_total)} is below it")
    choice: dict[str, Optional[int]] = {}
    energy: dict[str, torch.Tensor] = {}
    spent = model_total
    heap: list[tuple[float, int, str]] = []
    by_name = {layer.target.name: layer for layer in layers}
    order = {layer.target.name: i for i, layer in enumerate(layers)}

    def push(name: str) -> None:
        layer = by_name[name]
        t, rank = layer.target, choice[name]
        if rank is KEEP:
            return
        e = energy[name]
        nxt = rank + 1 if rank + 1 <= t.largest_saving_rank() else KEEP
        gain = float(e[rank:].sum()) if nxt is KEEP else float(e[rank])
        delta = cost(t, metric, nxt) - cost(t, metric, rank)
        ratio = float("inf") if delta <= 0 else gain / delta
        heapq.heappush(heap, (-ratio, order[name], name))

    for layer in layers:
        t = layer.target
        e = layer.s.double() ** 2
        energy[t.name] = e / e.sum() if float(e.sum()) > 0 else torch.zeros_like(e)
        if t.largest_saving_rank() >= 1 and cost(t, metric, 1) < cost(t, metric, KEEP):
            choice[t.name] = 1
            spent -= cost(t, metric, KEEP) - cost(t, metric, 1)
            push(t.name)
        else:
            choice[t.name] = KEEP
    while heap:
        _, _, name = heapq.heappop(heap)
        t, rank = by_name[name].target, choice[name]
        nxt = rank + 1 if rank + 1 <= t.largest_saving_rank() else KEEP
        delta = cost(t, metric, nxt) - cost(t, metric, rank)
        if spent + delta > target_total:
            continue  # this layer's later steps cost even more: it stays where it is
        spent += delta
        choice[name] = nxt
        push(name)
    return choice


# -- falor: measured per-layer losses -------------------------------------------------------------------
Curve = list[tuple[int, float, float]]  # (rank, loss, kl), ranks descending, losses made non-decreasing


def _curves(results: list[FalorResult], key: str) -> dict[str, Curve]:
    """Each layer's measured trials, ranks descending; a lower rank never counts as better than a higher one."""
    options: dict[str, Curve] = {}
    for res in results:
        curve, worst_nsr, worst_kl = [], 0.0, 0.0
        for t in sorted(res.trials, key=lambda t: -t["rank"]):
            worst_nsr, worst_kl = max(worst_nsr, t[key]), max(worst_kl, t.get("kl", 0.0))
            curve.append((t["rank"], worst_nsr, worst_kl))
        options[res.name] = curve
    return options


def _best_move(options: dict[str, Curve], position: dict[str, int], cost_at: dict[str, Any],
               cost_now: dict[str, int], fits) -> Optional[tuple[float, str, int, float, float]]:
    """The move of one layer to a lower measured rank saving the most cost per unit of loss added, among
    those ``fits(added_loss, added_kl)`` allows (looking past the first, barely-saving rank avoids
    stalling on it); ``None`` when there is none."""
    best = None
    for name, curve in options.items():
        i = position[name]
        prev_nsr, prev_kl = (0.0, 0.0) if i < 0 else curve[i][1:]
        prev_cost = cost_now[name] if i < 0 else cost_at[name](curve[i][0])
        for j in range(i + 1, len(curve)):
            rank, nsr, kl = curve[j]
            add_nsr, add_kl = nsr - prev_nsr, kl - prev_kl
            if not fits(add_nsr, add_kl):
                break  # later ranks add even more
            value = (prev_cost - cost_at[name](rank)) / max(add_nsr, 1e-12)
            if best is None or value > best[0]:
                best = (value, name, j, add_nsr, add_kl)
    return best


def allocate_nsr(results: list[FalorResult], params_at: dict[str, Any], params_now: dict[str, int],
                 nsr_budget: float, kl_budget: Optional[float], key: str = "nsr") -> dict[str, Optional[int]]:
    """Ranks minimising parameters with the sum of per-layer NSRs (and KLs) within the budgets.

    Greedy on the best ratio (:func:`_best_move`): every layer starts unchanged (NSR 0) and moves are
    taken while the sums fit. ``key``: the trial value summed (``nsr``, or ``cosine_loss``).
    """
    options = _curves(results, key)
    position = {name: -1 for name in options}  # -1: layer unchanged
    spent = [0.0, 0.0]

    def fits(add_nsr: float, add_kl: float) -> bool:
        return spent[0] + add_nsr < nsr_budget and (kl_budget is None or spent[1] + add_kl < kl_budget)

    while (best := _best_move(options, position, params_at, params_now, fits)) is not None:
        _, name, j, add_nsr, add_kl = best
        position[name] = j
        spent[0] += add_nsr
        spent[1] += add_kl
    return {name: (options[name][i][0] if i >= 0 else None) for name, i in position.items()}


def _interpolated(curve: Curve, rank: int) -> float:
    """The loss at ``rank``, linear between the measured ranks around it."""
    for (r_hi, l_hi, _), (r_lo, l_lo, _) in zip(curve, curve[1:]):
        if r_lo <= rank <= r_hi:
            return l_lo + (l_hi - l_lo) * (rank - r_lo) / (r_hi - r_lo)
    return curve[0][1] if rank >= curve[0][0] else curve[-1][1]


def allocate_to_saving(results: list[FalorResult], cost_at: dict[str, Any], cost_now: dict[str, int],
                       saving: float, key: str = "nsr") -> tuple[dict[str, Optional[int]], dict[str, dict]]:
    """Ranks that save at least ``saving`` (params or MACs, by ``cost_at`` / ``cost_now``) with the least
    summed loss: the greedy of :func:`allocate_nsr` until the saving is met, then its last move
    shortened to the highest rank that still meets it. That rank may lie between two measured ones:
    its loss is interpolated, and returned as a trial (``interpolated: True``) by layer name.
    :class:`BudgetError` when even every measured move together saves too little."""
    options = _curves(results, key)
    position = {name: -1 for name in options}
    saved, last = 0, None
    while saved < saving:
        best = _best_move(options, position, cost_at, cost_now, lambda add_nsr, add_kl: True)
        if best is None:
            raise BudgetError(f"the measured ranks save at most {saved} of the {int(saving)} needed")
        name, j = best[1], best[2]
        i = position[name]
        before = cost_now[name] if i < 0 else cost_at[name](options[name][i][0])
        last = (name, i, j, saved, before)
        saved += before - cost_at[name](options[name][j][0])
        position[name] = j
    ranks = {name: (options[name][i][0] if i >= 0 else None) for name, i in position.items()}
    estimates: dict[str, dict] = {}
    if last is not None:
        name, i, j, saved_before, before = last
        curve = options[name]
        low, high = curve[j][0], curve[max(i, 0)][0]  # from an unchanged layer: up to its largest measured rank
        rank = next(r for r in range(high, low - 1, -1) if saved_before + before - cost_at[name](r) >= saving)
        ranks[name] = rank
        if rank not in {r for r, _, _ in curve}:
            estimates[name] = {"rank": rank, key: _interpolated(curve, rank), "interpolated": True}
    return ranks, estimates
