"""Which layers a low-rank node looks at, and what each costs at a given rank.

A :class:`Target` is one layer seen as its matrix ``M`` (rows x cols): the
parameters and per-sample MACs it has now, and what a rank-``r``
factorisation would have. MACs need the layer's spatial / token extent,
read from one forward pass (:func:`probe_positions`).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ...data import batch_size, call_model
from ..toolkit import evaluating, forward_hooks
from .layers import FactorizedLayer, io_dims, layer_kind
from .svd import effective_mode, spatial_ok

Ranks = dict[str, Optional[int]]  # layer -> rank, or None: leave the layer as it is


@dataclass
class Target:
    """One factorisable layer: shapes and costs (params, MACs per sample)."""

    name: str
    kind: str  # linear | conv | embedding
    mode: str  # channel | spatial
    rows: int
    cols: int
    params: int  # now (weights + bias)
    bias: int
    macs: int  # now, per sample
    macs_per_rank: int  # MACs per sample of each unit of rank once factorised
    current_rank: Optional[int] = None  # set for an already factorised layer
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def full_rank(self) -> int:
        return min(self.rows, self.cols)

    @property
    def max_rank(self) -> int:
        """Largest rank a factorisation may have (an existing one is only ever narrowed)."""
        return min(self.full_rank, self.current_rank or self.full_rank)

    def params_at(self, rank: int) -> int:
        return rank * (self.rows + self.cols) + self.bias

    def macs_at(self, rank: int) -> int:
        return rank * self.macs_per_rank

    def saves(self, rank: int) -> bool:
        """Fewer parameters, and no more MACs (embeddings: lookups have no MACs to save)."""
        if self.params_at(rank) >= self.params:
            return False
        return self.kind == "embedding" or self.macs_at(rank) <= self.macs

    def largest_saving_rank(self) -> int:
        """Largest rank that still saves (0 when none does)."""
        r = min(self.max_rank, max(0, (self.params - self.bias - 1) // (self.rows + self.cols)))
        while r > 0 and not self.saves(r):
            r -= 1
        return r


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied embeddings...): never factorised."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def find_layers(model: nn.Module, kinds: Iterable[str], include: Optional[list[str]] = None,
                exclude: Optional[list[str]] = None, refactorize: bool = True) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the factorisable layers, in model order.

    ``include`` / ``exclude`` are shell patterns on qualified names. The two
    layers inside a :class:`FactorizedLayer` are never candidates themselves;
    the factorised layer is (it can be narrowed) when ``refactorize``.
    """
    kinds = set(kinds)
    shared = _shared_weights(model)
    inside: set[str] = set()
    found = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, FactorizedLayer):
            inside.add(name)
            if not refactorize:
                continue
        kind = layer_kind(module)
        if kind is None or kind not in kinds or not name:
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if any(id(p) in shared for p in module.parameters()):
            continue
        found.append((name, module))
    return found


@torch.no_grad()
def probe_positions(model: nn.Module, inputs: Any, names: list[str]) -> dict[str, dict[str, int]]:
    """Per-sample extent of each named layer on one batch: ``tokens`` (Linear, Embedding) or conv
    output ``positions`` (and ``first_positions`` of a spatial form). Layers not run get zeros."""
    found: dict[str, dict[str, int]] = {}
    n = max(batch_size(inputs), 1)

    def hook(name):
        def record(module, args, out):
            x = args[0]
            plain = module.first if isinstance(module, FactorizedLayer) else module
            if isinstance(plain, (nn.Conv1d, nn.Conv2d)):
                positions = int(out[0, 0].numel())
                first_positions = positions
                if out.dim() == 4:
                    first_positions = int(out.shape[2] * x.shape[3])
                found[name] = {"positions": positions, "first_positions": first_positions}
            else:
                found[name] = {"tokens": int(out.numel() // (n * out.shape[-1]))}
        return record

    with forward_hooks(model, {name: hook(name) for name in names}), evaluating(model):
        call_model(model, inputs)
    return found


def make_target(name: str, module: nn.Module, mode: str, extent: dict[str, int]) -> Target:
    """The :class:`Target` of ``module`` factorised in ``mode`` (``extent`` from :func:`probe_positions`)."""
    mode = effective_mode(module, mode)
    kind = layer_kind(module)
    cin, cout = io_dims(module)
    plain = module.first if isinstance(module, FactorizedLayer) else module
    bias_layer = module.second if isinstance(module, FactorizedLayer) else module
    bias = bias_layer.bias.numel() if getattr(bias_layer, "bias", None) is not None else 0
    params = sum(p.numel() for p in module.parameters())
    tokens = extent.get("tokens", 0)
    positions, first_positions = extent.get("positions", 0), extent.get("first_positions", 0)
    if kind == "linear":
        rows, cols = cout, cin
        macs_per_rank = (cin + cout) * tokens
        dense_macs = cin * cout * tokens
    elif kind == "embedding":
        rows, cols = cin, cout
        macs_per_rank = cout * tokens
        dense_macs = 0
    elif mode == "spatial":
        if isinstance(module, FactorizedLayer):
            kh, kw = module.first.kernel_size[0], module.second.kernel_size[1]
        else:
            kh, kw = module.kernel_size
        rows, cols = cin * kh, cout * kw
        macs_per_rank = cin * kh * first_positions + cout * kw * positions
        dense_macs = cin * kh * kw * cout * positions
    else:
        k = int(torch.tensor(plain.kernel_size).prod())
        rows, cols = cout, cin * k
        macs_per_rank = (cin * k + cout) * positions
        dense_macs = cin * k * cout * positions
    current = None
    if isinstance(module, FactorizedLayer):
        current = module.rank
        dense_macs = current * macs_per_rank
    return Target(name, kind, mode, rows, cols, params, bias, dense_macs, macs_per_rank, current)


__all__ = ["Ranks", "Target", "find_layers", "probe_positions", "make_target", "spatial_ok"]
