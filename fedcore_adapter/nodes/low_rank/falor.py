"""Activation-aware decomposition (ptdeco's falor: "features are low-rank").

For each Linear and 1x1 conv: the second moment ``E[y y^T]`` of its outputs ``y = W x``
over the calibration batches (or, as ptdeco's ``use_mean``, their centred covariance)
gives eigenvectors ``E``; the weight is projected on the top-k of them,
``W ~ E_k (E_k^T W)``, which minimises ``E||y - E_k E_k^T y||^2``; k is the smallest rank for which the
model's output noise-to-signal ratio (and optionally the symmetric KL of its
softmax) stays under the threshold, with only that layer changed. No training,
no labels: dict batches of a text encoder work.

The rank search may measure, instead of the NSR, the cosine loss ``1 - mean cosine`` of the model's
per-sample outputs (a text encoder's mean-pooled sentence embeddings): :data:`METRICS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ...data import call_model, primary_output
from ..toolkit import evaluating


@dataclass
class FalorJob:
    """One layer's output covariance and the largest rank that still saves parameters; ``output_weight``
    (``(R, R^-1)``, ``falor_weighting='gradient'``): the projection is the best in the ``R``-weighted norm."""

    name: str
    covariance: torch.Tensor
    max_rank: int
    output_weight: Optional[tuple[torch.Tensor, torch.Tensor]] = None


@dataclass
class FalorResult:
    name: str
    rank: Optional[int]  # None: no saving rank meets the thresholds
    eigvecs: Optional[torch.Tensor] = None  # top-`rank` output eigenvectors (out x rank, float64)
    nsr: Optional[float] = None
    kl: Optional[float] = None
    evaluations: int = 0
    trials: list[dict] = field(default_factory=list)


def top_eigenvectors(covariance: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a covariance, largest eigenvalue first (float64, deterministic sign)."""
    values, vectors = torch.linalg.eigh(covariance.double())
    vectors = vectors.flip(1)
    signs = torch.sign(vectors[vectors.abs().argmax(0), torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors * signs


def output_rows(out: torch.Tensor, inputs: Any) -> torch.Tensor:
    """Model output as rows x channels; padded tokens of a text batch are left out."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is not None and out.dim() == 3 and tuple(out.shape[:2]) == tuple(mask.shape):
        return out[mask.bool()].float()
    return out.reshape(-1, out.shape[-1]).float() if out.dim() > 1 else out.reshape(-1, 1).float()


def noise_to_signal(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over channels of mean squared error / variance of the reference channel."""
    variance = reference.var(0, unbiased=False)
    eps = 1e-6 * float(variance.mean()) + 1e-12
    return float(((candidate - reference) ** 2).mean(0).div(variance + eps).mean())


def symmetric_kl(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """max(KL(p||q), KL(q||p)) of the softmax over channels, averaged over rows (ptdeco's measure)."""
    lp, lq = torch.log_softmax(reference, -1), torch.log_softmax(candidate, -1)
    kl_pq = (lp.exp() * (lp - lq)).sum(-1)
    kl_qp = (lq.exp() * (lq - lp)).sum(-1)
    return float(torch.maximum(kl_pq, kl_qp).mean())


def model_rows(model: nn.Module, inputs: list[Any]) -> list[torch.Tensor]:
    """The model's primary output on each batch, as rows (the reference the search compares to)."""
    with torch.no_grad():
        return [output_rows(primary_output(call_model(model, x)), x) for x in inputs]


def per_sample(out: torch.Tensor, inputs: Any) -> torch.Tensor:
    """One vector per sample: [batch, tokens, channels] mean-pooled over the real tokens, else flattened."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    out = out.float()
    if out.dim() == 3:
        if mask is not None and tuple(out.shape[:2]) == tuple(mask.shape):
            m = mask.to(out.dtype).unsqueeze(-1)
            return (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return out.mean(1)
    return out.reshape(out.shape[0], -1) if out.dim() > 1 else out.reshape(-1, 1)


def model_outputs(model: nn.Module, inputs: list[Any], metric: str = "nsr") -> list[torch.Tensor]:
    """Rows (``nsr``) or per-sample vectors (``cosine``) of the model's primary output on each batch."""
    if metric == "nsr":
        return model_rows(model, inputs)
    with torch.no_grad():
        return [per_sample(primary_output(call_model(model, x)), x) for x in inputs]


def cosine_loss(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """``1 - mean cosine`` of matching rows (per-sample outputs)."""
    return float(1 - torch.nn.functional.cosine_similarity(candidate, reference, dim=1).mean())


METRICS = {"nsr": noise_to_signal, "cosine": cosine_loss}
TRIAL_KEY = {"nsr": "nsr", "cosine": "cosine_loss"}  # the name under which a trial stores each metric


def distance(outs: list[torch.Tensor], references: list[torch.Tensor], metric: str = "nsr") -> float:
    """The metric averaged over batches."""
    return sum(METRICS[metric](o, r) for o, r in zip(outs, references)) / len(outs)


def _weight_2d(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().reshape(layer.weight.shape[0], -1)


def _projector(job: FalorJob, layer: nn.Module):
    """The eigenvectors ranked for this layer and ``project(k)``: its weight (out x in) at rank ``k``,
    ``E_k E_k^T W``, or ``R^-1 U_k U_k^T R W`` with ``U`` the eigenvectors of ``R C R`` when weighted."""
    w = _weight_2d(layer).double().cpu()
    if job.output_weight is None:
        vectors = top_eigenvectors(job.covariance)
        return vectors, lambda k: vectors[:, :k] @ (vectors[:, :k].T @ w)
    r, r_inv = job.output_weight
    vectors = top_eigenvectors(r @ job.covariance.double() @ r)
    rw = r @ w
    return vectors, lambda k: r_inv @ (vectors[:, :k] @ (vectors[:, :k].T @ rw))


def _trial(model: nn.Module, layer: nn.Module, original: torch.Tensor, projected: torch.Tensor, inputs: list[Any],
           references: list[torch.Tensor], with_kl: bool, metric: str) -> tuple[float, Optional[float]]:
    """The metric (and KL) of the model's output with ``layer``'s weight temporarily replaced by ``projected``."""
    with torch.no_grad():
        layer.weight.copy_(projected)
        try:
            outs = model_outputs(model, inputs, metric)
        finally:
            layer.weight.copy_(original)
    kl = sum(symmetric_kl(o, r) for o, r in zip(outs, references)) / len(outs) if with_kl else None
    return distance(outs, references, metric), kl


def falor_search(job: FalorJob, *, model: nn.Module, inputs: list[Any], references: list[torch.Tensor],
                 nsr_threshold: float, kl_threshold: Optional[float], grid: Optional[int] = None,
                 metric: str = "nsr") -> FalorResult:
    """Per-layer rank measurement with only this layer changed (its weight is restored after each trial).

    ``grid=None`` (ptdeco's per-layer rule): binary search for the smallest rank k <= ``job.max_rank``
    whose model-output NSR (and KL) is under the thresholds. ``grid=G``: the NSR at G evenly spaced
    ranks up to ``job.max_rank`` (for the global allocation), every one kept in ``trials``.
    ``metric='cosine'``: the cosine loss instead of the NSR (``references`` from :func:`model_outputs`,
    ``nsr_threshold`` its bound), stored as ``cosine_loss``.
    """
    key = TRIAL_KEY[metric]
    layer = model.get_submodule(job.name)
    result = FalorResult(job.name, None)
    if job.max_rank < 1:
        return result
    vectors, project = _projector(job, layer)
    original = layer.weight.detach().clone()

    def trial(k: int) -> bool:
        projected = project(k).to(original.dtype).reshape(original.shape).to(original.device)
        nsr, kl = _trial(model, layer, original, projected, inputs, references, kl_threshold is not None, metric)
        result.evaluations += 1
        result.trials.append({"rank": k, key: nsr, **({"kl": kl} if kl is not None else {})})
        return nsr < nsr_threshold and (kl_threshold is None or kl < kl_threshold)

    with evaluating(model):
        if grid:
            for k in sorted({max(1, round(job.max_rank * (i + 1) / grid)) for i in range(grid)}):
                trial(k)
            result.eigvecs = vectors[:, :job.max_rank].clone()
            return result
        if not trial(job.max_rank):
            return result
        best, lo, hi = job.max_rank, 1, job.max_rank - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if trial(mid):
                best, hi = mid, mid - 1
            else:
                lo = mid + 1
    chosen = next(t for t in result.trials if t["rank"] == best)
    result.rank, result.nsr, result.kl = best, chosen[key], chosen.get("kl")
    result.eigvecs = vectors[:, :best].clone()
    return result


def falor_factors(layer: nn.Module, eigvecs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B) = (E_k, E_k^T W)`` in the layer's matrix form (out x in)."""
    w = _weight_2d(layer).double().cpu()
    return eigvecs, eigvecs.T @ w
