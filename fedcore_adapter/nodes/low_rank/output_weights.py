"""Gradient weighting of layer outputs for the sequential falor fit (``falor_weighting='gradient'``).

A layer's output error does not reach the model's output equally in every direction. To first
order the metric output moves by ``J dy``, where ``J`` is its Jacobian with respect to the layer's
output ``y``. With Gaussian probes ``v``, ``g = J^T v`` has ``E[g g^T] = J^T J`` (Hutchinson), so
``G = E[g g^T]`` over the calibration tokens is the Gauss-Newton metric of that layer's output:
``E||J dy||^2 = E[dy^T G dy]``. The sequential fit then keeps the rank-k that is best in the
``G^{1/2}``-weighted norm instead of the plain one. This is Fisher-weighted low rank
(FWSVD, Hsu et al. 2022) with the full matrix instead of its diagonal.

The metric output is what the rank search bounds:
- ``cosine``: each sample's vector (mean-pooled over real tokens), normalised to unit length, so
  errors that only rescale it cost nothing;
- ``nsr``: the model's primary output rows.

No weight is changed and no optimizer runs. Only gradients with respect to the layer outputs are
taken, never the parameters', so a model with frozen weights works too.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ...data import call_model, primary_output
from ..toolkit import evaluating, forward_hooks
from . import falor
from .sequential import layer_rows

MAX_GRAM_ELEMENTS = 2 ** 25  # accumulators held at once (float64: 256 MiB); more layers take more passes
GRAM_FLOOR = 0.01  # added to G / mean eigenvalue, so directions the probes never saw still count a little


def metric_output(model: nn.Module, inputs: Any, metric: str) -> torch.Tensor:
    """What the rank search compares: unit per-sample vectors (``cosine``) or the output rows (``nsr``)."""
    out = primary_output(call_model(model, inputs))
    if metric == "cosine":
        vectors = falor.per_sample(out, inputs)
        return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return falor.output_rows(out, inputs)


def _passes(names: list[str], sizes: dict[str, int]) -> Iterator[list[str]]:
    """``names`` in groups whose ``size**2`` accumulators fit MAX_GRAM_ELEMENTS together (one layer at least)."""
    group: list[str] = []
    used = 0
    for name in names:
        need = sizes[name] ** 2
        if group and used + need > MAX_GRAM_ELEMENTS:
            yield group
            group, used = [], 0
        group.append(name)
        used += need
    if group:
        yield group


def _one_pass(model: nn.Module, inputs: list[Any], names: list[str], metric: str, probes: int,
              generator: torch.Generator) -> dict[str, torch.Tensor]:
    modules = {n: model.get_submodule(n) for n in names}
    sums: dict[str, Any] = {n: 0 for n in names}
    counts = {n: 0 for n in names}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def keep(module, args, out):
            if not out.requires_grad:  # frozen weights upstream: differentiate from here on
                out.requires_grad_()
            outputs[name] = out
            return out.clone()  # later in-place ops change the clone, not the tensor differentiated

        return keep

    with forward_hooks(model, {n: hook(n) for n in names}):
        for x in inputs:
            outputs.clear()
            with torch.enable_grad():
                y = metric_output(model, x, metric)
                missing = [n for n in names if n not in outputs]
                if missing:
                    raise RuntimeError(f"layer {missing[0]} did not run in the forward pass")
                tensors = [outputs[n] for n in names]
                mask = x.get("attention_mask") if isinstance(x, dict) else None
                for p in range(probes):
                    v = torch.randn(y.shape, generator=generator).to(y.device, y.dtype)
                    grads = torch.autograd.grad((v * y).sum(), tensors, retain_graph=p < probes - 1,
                                                allow_unused=True)
                    for name, g in zip(names, grads):
                        if g is not None:
                            rows = layer_rows(modules[name], g, mask)
                            sums[name] = sums[name] + rows.T @ rows
                            counts[name] += rows.shape[0]
    grams = {}
    for name in names:
        size = modules[name].weight.shape[0]
        grams[name] = sums[name] / counts[name] if counts[name] else torch.eye(size, dtype=torch.float64)
    return grams


def gradient_grams(model: nn.Module, inputs: list[Any], names: list[str], metric: str, probes: int,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """``G = E[g g^T]`` (float64, outputs x outputs) for every layer in ``names``, over the real tokens of
    ``inputs`` with ``probes`` Gaussian probes per batch (seeded: the same inputs give the same weights)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = {n: int(model.get_submodule(n).weight.shape[0]) for n in names}
    grams: dict[str, torch.Tensor] = {}
    with evaluating(model):
        for group in _passes(names, sizes):
            grams.update(_one_pass(model, inputs, group, metric, probes, generator))
    return grams


def sqrt_pair(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, R^-1)`` with ``R = (G / mean eigenvalue + GRAM_FLOOR I)^{1/2}``, symmetric, float64."""
    n = gram.shape[0]
    scale = float(gram.trace()) / n
    g = (gram / scale if scale > 0 else torch.zeros_like(gram)) + GRAM_FLOOR * torch.eye(n, dtype=gram.dtype)
    values, vectors = torch.linalg.eigh(g)
    values = values.clamp_min(GRAM_FLOOR)
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T
