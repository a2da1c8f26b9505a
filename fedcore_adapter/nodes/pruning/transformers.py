"""Attention-head and FFN-channel pruning of transformer encoders; the hidden size is kept.

Supported blocks: Hugging Face BERT-family layers (``attention.self.{query,key,value}``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense`` — BERT, RoBERTa,
all-MiniLM...) and ``nn.TransformerEncoderLayer`` (FFN only: ``nn.MultiheadAttention``
needs its query size to equal the hidden size, so its heads are kept). Each block
gives up to two layer groups: ``<block>.attention`` (heads) and the FFN's first
linear (``<block>.intermediate`` / ``<block>.linear1``). Head counts are updated on
the attention modules so the model still runs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...errors import NodeError
from .factors import factor_part
from .history import History
from .reconstruction import Reconstruction, obs_choice, refit_consumer
from .structured import PruningWarning, Ratio, _matches, ratio_for, scheduled_ratio, screen_small_groups


@dataclass
class UnitGroup:
    """Units (heads or FFN channels) removed together from a producer's rows and a consumer's columns."""

    name: str
    producers: list[str]  # linears whose output rows hold the units
    consumer: str  # linear whose input columns hold the units
    unit_size: int  # channels per unit (head size for heads, 1 for FFN)
    units: int
    ratio: float
    attention: Optional[str] = None  # module whose head count follows (heads only)


def _factor(model: nn.Module, name: str, part: str) -> str:
    """``name``, or ``name.<part>`` when a low-rank node made it a factor pair ``second(first(x))``: a
    producer's output rows are in ``second``, a consumer's input columns in ``first``."""
    return f"{name}.{part}" if isinstance(factor_part(model.get_submodule(name), part), nn.Linear) else name


def find_groups(model: nn.Module) -> list[UnitGroup]:
    """Head and FFN groups of every supported transformer block, in model order (ratios not yet set)."""
    groups = []

    def out(name: str) -> str:
        return _factor(model, name, "second")

    def into(name: str) -> str:
        return _factor(model, name, "first")

    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        att = getattr(getattr(m, "attention", None), "self", None)
        if att is not None and all(hasattr(att, k) for k in ("query", "key", "value", "num_attention_heads")) \
                and hasattr(m, "intermediate") and hasattr(m, "output"):
            groups.append(UnitGroup(f"{p}attention", [out(f"{p}attention.self.{k}") for k in ("query", "key", "value")],
                                    into(f"{p}attention.output.dense"), att.attention_head_size,
                                    att.num_attention_heads, 0.0, f"{p}attention.self"))
            ffn = out(f"{p}intermediate.dense")
            groups.append(UnitGroup(f"{p}intermediate", [ffn], into(f"{p}output.dense"), 1,
                                    model.get_submodule(ffn).out_features, 0.0))
        elif isinstance(m, nn.TransformerEncoderLayer):
            ffn = out(f"{p}linear1")
            groups.append(UnitGroup(f"{p}linear1", [ffn], into(f"{p}linear2"), 1, model.get_submodule(ffn).out_features,
                                    0.0))
    return groups


def _channel_scores(model: nn.Module, group: UnitGroup, importance: str, norm: float) -> torch.Tensor:
    """Importance of each channel of ``group`` (summed over its producer rows and consumer columns)."""
    def score(t: torch.Tensor, g: Optional[torch.Tensor]) -> torch.Tensor:
        if importance == "taylor":
            return (t * g).abs() if g is not None else torch.zeros_like(t)
        return t.abs().pow(norm)

    total = None
    for name in group.producers:
        layer = model.get_submodule(name)
        s = score(layer.weight, layer.weight.grad).sum(1)
        if layer.bias is not None:
            s = s + score(layer.bias, layer.bias.grad)
        total = s if total is None else total + s
    consumer = model.get_submodule(group.consumer)
    return (total + score(consumer.weight, consumer.weight.grad).sum(0)).detach().float()


def unit_scores(model: nn.Module, group: UnitGroup, importance: str, norm: float) -> torch.Tensor:
    """Importance of each unit (head or channel); higher is kept."""
    n = model.get_submodule(group.consumer).in_features // group.unit_size
    if importance == "random":
        return torch.rand(n)
    return _channel_scores(model, group, importance, norm).view(n, group.unit_size).sum(1)


def _normalise(scores: torch.Tensor, importance: str) -> torch.Tensor:
    """Scores comparable across groups (global ranking): LAMP, else divided by the group mean."""
    if importance == "lamp":
        order = torch.argsort(scores)
        sorted_scores = scores[order]
        tail = torch.flip(torch.cumsum(torch.flip(sorted_scores, [0]), 0), [0])
        out = torch.empty_like(scores)
        out[order] = sorted_scores / tail.clamp_min(1e-12)
        return out
    return scores / scores.mean().clamp_min(1e-12)


class TransformerPruner:
    """Iterative head and FFN-channel removal; every removal is recorded in a :class:`History`."""

    def __init__(self, model: nn.Module, groups: list[UnitGroup], *, label: str, ratio: Ratio,
                 head_ratio: Optional[float], steps: int, importance: str = "magnitude", importance_norm: float = 2.0,
                 global_pruning: bool = False, round_to: Optional[int] = None, ignored_layers: tuple[str, ...] = (),
                 schedule: str = "linear", reconstruction: Optional[Reconstruction] = None):
        self.schedule, self.reconstruction = schedule, reconstruction
        if importance == "obs" and reconstruction is None:
            raise NodeError(label, "importance 'obs' ranks units by the error left after the least-squares re-fit; "
                                   "it needs reconstruct: true")
        if importance == "bn_scale":
            raise NodeError(label, "importance 'bn_scale' ranks channels by BatchNorm scales, but this transformer has "
                                   "no BatchNorm layer; use magnitude, taylor, lamp or random")
        self.model, self.label, self.steps = model, label, steps
        self.importance, self.norm = importance, importance_norm
        self.global_pruning, self.round_to = global_pruning, round_to
        if isinstance(ratio, dict):
            for key in ratio:
                if not any(_matches(g.name, key) for g in groups):
                    raise NodeError(label, f"pruning_ratio names {key!r}, which holds no attention or FFN group; "
                                           f"prunable groups: {', '.join(g.name for g in groups[:12])}")
        known = {name for name, _ in model.named_modules()}
        for name in ignored_layers:
            if name not in known and not any(_matches(g.name, name) for g in groups):
                raise NodeError(label, f"ignored_layers names layer {name!r}, which the model does not have; "
                                       f"prunable groups: {', '.join(g.name for g in groups[:12])}")
        self.groups = [g for g in groups if not any(_matches(g.name, name) for name in ignored_layers)]
        for g in self.groups:
            heads = g.attention is not None and head_ratio is not None and not isinstance(ratio, dict)
            g.ratio = head_ratio if heads else ratio_for(g.name, ratio)
        small = screen_small_groups(label, {g.name: (g.units, g.ratio) for g in self.groups if g.attention}, ratio,
                                    unit="head")
        small += screen_small_groups(label, {g.name: (g.units, g.ratio) for g in self.groups if not g.attention},
                                     ratio, round_to)
        self.groups = [g for g in self.groups if g.name not in small]
        self.removed = {g.name: 0 for g in self.groups}
        if any(isinstance(m, nn.TransformerEncoderLayer) for m in model.modules()):
            warnings.warn(f"node {label}: heads of nn.MultiheadAttention are kept (its query size must equal the "
                          f"hidden size); only FFN channels of nn.TransformerEncoderLayer are pruned", PruningWarning,
                          stacklevel=3)

    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def _target(self, g: UnitGroup, step: int) -> int:
        """Units removed in total after ``step`` (1-based) of the schedule."""
        kept = int(g.units * (1 - scheduled_ratio(self.schedule, g.ratio, step, self.steps)))
        if self.round_to and g.attention is None:
            kept -= kept % self.round_to
        return g.units - max(kept, 1)

    def _choose(self, step: int) -> dict[str, list[int]]:
        """Indices of units (in the current numbering) to remove from each group at ``step``."""
        scores = {g.name: unit_scores(self.model, g, self.importance, self.norm) for g in self.groups}
        want = {g.name: self._target(g, step) - self.removed[g.name] for g in self.groups}
        if not self.global_pruning:
            return {name: torch.argsort(scores[name])[:k].tolist() for name, k in want.items() if k > 0}
        chosen: dict[str, list[int]] = {}
        for heads in (True, False):  # heads and FFN channels are ranked in separate pools
            pool = [g for g in self.groups if (g.attention is not None) == heads]
            budget = sum(max(want[g.name], 0) for g in pool)
            ranked = sorted((float(s), g.name, i) for g in pool
                            for i, s in enumerate(_normalise(scores[g.name], self.importance)))
            for _, name, i in ranked:
                if budget <= 0:
                    break
                if len(scores[name]) - len(chosen.get(name, [])) > 1:
                    chosen.setdefault(name, []).append(i)
                    budget -= 1
        return chosen

    def step(self, history: History, step: int) -> None:
        """Remove the units scheduled for ``step`` (1-based) and record them; with a reconstruction, group by
        group in model order, each consumer re-fitted before the next group's statistics are taken."""
        obs = self.importance == "obs"
        chosen = {} if obs else self._choose(step)
        for g in self.groups:
            stats = None
            want = self._target(g, step) - self.removed[g.name] if obs else len(chosen.get(g.name, []))
            if self.reconstruction is not None and want > 0:
                stats = self.reconstruction.stats(self.model, g.consumer)
                if obs:
                    chosen[g.name] = obs_choice(stats, g.unit_size, want)
            units = sorted(chosen.get(g.name, []))
            if not units:
                continue
            idxs = [u * g.unit_size + j for u in units for j in range(g.unit_size)]
            for producer in g.producers:
                history.add(producer, "out", idxs)
                _prune_linear(self.model.get_submodule(producer), idxs, out=True)
            history.add(g.consumer, "in", idxs)
            consumer = self.model.get_submodule(g.consumer)
            kept = sorted(set(range(consumer.in_features)) - set(idxs))
            _prune_linear(consumer, idxs, out=False)
            if stats is not None:
                refit_consumer(consumer, stats, kept)
            self.removed[g.name] += len(units)
            if g.attention is not None:
                att = self.model.get_submodule(g.attention)
                heads = att.num_attention_heads - len(units)
                att.num_attention_heads, att.all_head_size = heads, heads * att.attention_head_size
                history.set_attributes(g.attention, num_attention_heads=heads, all_head_size=att.all_head_size)


def _prune_linear(layer: nn.Linear, idxs: list[int], out: bool) -> None:
    from torch_pruning.pruner import function as tp_function

    (tp_function.prune_linear_out_channels if out else tp_function.prune_linear_in_channels)(layer, idxs)
