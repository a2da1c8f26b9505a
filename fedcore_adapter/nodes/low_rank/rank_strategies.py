"""Rank strategies (``spectrum_pruning_strategy``): singular values -> the rank to keep.

Every strategy is a pure function of the spectrum (and, for ``params_ratio``,
the layer's shape): the rank never depends on the machine (FedCore rounded it
to a multiple of the CPU count; this does not).

- ``energy``: smallest r keeping >= threshold of sum(sigma^2) (the weight's Frobenius energy)
- ``explained_variance``: smallest r keeping >= threshold of the layer's output variance on the
  calibration batches (sigma_i^2 weighted by the input variance along v_i; no data -> energy)
- ``quantile``: keep the singular values above the threshold-quantile of the spectrum
- ``rank``: a fixed rank
- ``rank_ratio``: ceil(threshold x full rank)
- ``params_ratio``: largest r whose factorised parameters are <= threshold x the layer's
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .targets import Target

STRATEGIES = ("energy", "explained_variance", "quantile", "rank", "rank_ratio", "params_ratio")
_TOL = 1e-9


def kept_fraction(s: torch.Tensor, rank: int, weights: Optional[torch.Tensor] = None) -> float:
    """Share of sum(w_i sigma_i^2) that the first ``rank`` components keep (1.0 for a zero matrix)."""
    e = s.double() ** 2 * (weights.double() if weights is not None else 1.0)
    total = float(e.sum())
    return 1.0 if total <= 0 else float(e[:rank].sum()) / total


def _smallest_rank_keeping(e: torch.Tensor, threshold: float) -> int:
    total = float(e.sum())
    if total <= 0:
        return 1
    cumulative = torch.cumsum(e, 0) / total
    return min(int((cumulative < threshold - _TOL).sum()) + 1, len(e))


def choose_rank(strategy: str, s: torch.Tensor, target: Target, *, threshold: Optional[float] = None,
                rank: Optional[int] = None, weights: Optional[torch.Tensor] = None) -> int:
    """The rank ``strategy`` keeps for a layer with singular values ``s`` (descending); at least 1."""
    s = s.double()
    if strategy == "energy":
        r = _smallest_rank_keeping(s**2, threshold)
    elif strategy == "explained_variance":
        r = _smallest_rank_keeping(s**2 * (weights.double() if weights is not None else 1.0), threshold)
    elif strategy == "quantile":
        r = int((s > torch.quantile(s, threshold)).sum())
    elif strategy == "rank":
        r = int(rank)
    elif strategy == "rank_ratio":
        r = math.ceil(threshold * len(s) - _TOL)
    elif strategy == "params_ratio":
        r = int((threshold * target.params - target.bias + _TOL) // (target.rows + target.cols))
    else:
        raise ValueError(f"unknown spectrum_pruning_strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    return max(1, min(r, len(s)))
