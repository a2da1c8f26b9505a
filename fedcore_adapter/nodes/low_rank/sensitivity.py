"""Per-layer measurements that may run on a cluster (``ctx.map``): picklable jobs and module-level functions.

- :func:`rank_sensitivity`: a layer's SVD and how much each component matters (energy, or output
  variance on the calibration data for ``explained_variance``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .svd import svd


@dataclass
class SpectrumJob:
    """One layer's matrix ``M`` and, optionally, its input statistic (covariance or token frequencies)."""

    name: str
    matrix: torch.Tensor  # float64, rows x cols
    statistic: Optional[torch.Tensor] = None
    statistic_side: str = "cols"  # cols: covariance over M's columns; rows: frequencies over M's rows


@dataclass
class Spectrum:
    """``M = U diag(s) Vh`` with ``s`` descending, and the weight of each component in the output."""

    name: str
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    weights: Optional[torch.Tensor] = None  # output variance carried by component i, per unit sigma_i^2


def component_weights(u: torch.Tensor, vh: torch.Tensor, statistic: Optional[torch.Tensor],
                      side: str) -> Optional[torch.Tensor]:
    """``v_i^T C v_i`` (input covariance C) or ``sum_t p_t u_i[t]^2`` (token frequencies p)."""
    if statistic is None:
        return None
    if side == "rows":
        return (u**2 * statistic[:, None]).sum(0)
    return torch.einsum("ij,jk,ik->i", vh, statistic, vh)


def rank_sensitivity(job: SpectrumJob) -> Spectrum:
    """SVD of one layer (float64) and per-component output weights; safe to run on a Dask worker."""
    u, s, vh = svd(job.matrix)
    return Spectrum(job.name, u, s, vh, component_weights(u, vh, job.statistic, job.statistic_side))
