"""Global budget: per-layer ranks that bring the whole model to a target params or MACs count
with the least energy lost.

Greedy on marginal value: every layer starts at its cheapest option (rank 1,
or left as it is when no rank saves); the step with the most energy regained
per unit of cost (params or MACs) is taken while it fits. A layer's steps are
rank r -> r + 1 while a factorisation still saves, then "keep the layer as it
is" (no energy lost). Energy lost is relative per layer: sum of sigma_i^2
beyond the rank over the layer's sum of sigma_i^2.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional

import torch

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


def minimum_total(targets: list[Target], model_total: int, metric: str) -> int:
    """The smallest model total reachable (every layer at its cheapest option); needs no spectrum."""
    total = model_total
    for t in targets:
        cheapest = min(cost(t, metric, KEEP), cost(t, metric, 1)) if t.largest_saving_rank() >= 1 \
            else cost(t, metric, KEEP)
        total -= cost(t, metric, KEEP) - cheapest
    return total


def allocate(layers: list[LayerSpectrum], model_total: int, target_total: float, metric: str) -> dict[str, Optional[int]]:
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
