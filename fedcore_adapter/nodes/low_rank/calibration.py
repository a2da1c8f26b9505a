"""Calibration data and the layer statistics gathered on it (one forward pass per batch, all layers at once).

- input covariance of each layer (for ``explained_variance``): features of a Linear, unfolded patches
  of a channel-mode conv, token frequencies of an Embedding;
- output second moment ``E[y y^T]`` (or centred covariance) of ``y = W x`` (bias excluded) of each
  Linear / 1x1 conv (for falor).

Padded tokens of a text batch (``attention_mask == 0``) are left out of every statistic: the
model's output ignores them, so their rows would only blur the statistics.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...context import NodeContext
from ...data import call_model
from ..toolkit import calibration_inputs as _inputs, calibration_limit, evaluating, forward_hooks
from .layers import FactorizedLayer

DEFAULT_CALIBRATION_BATCHES = 8


def calibration_inputs(ctx: NodeContext, override: Optional[int]) -> list[Any]:
    """Model inputs of the first ``override`` (else ``limit_valid_batches``, else 8) validation batches."""
    return _inputs(ctx, calibration_limit(ctx, override, DEFAULT_CALIBRATION_BATCHES), purpose="low-rank calibration",
                   device=ctx.device)


class _Moments:
    """Running sums for a centred covariance, in float64."""

    def __init__(self):
        self.n = 0
        self.sum: Optional[torch.Tensor] = None
        self.outer: Optional[torch.Tensor] = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(rows.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
        self.n += rows.shape[0]
        self.sum += rows.sum(0)
        self.outer += rows.T @ rows

    def covariance(self) -> Optional[torch.Tensor]:
        if not self.n:
            return None
        mean = self.sum / self.n
        return self.outer / self.n - torch.outer(mean, mean)

    def second_moment(self) -> Optional[torch.Tensor]:
        """``E[y y^T]`` (not centred): its top eigenvectors minimise ``E||y - P y||^2``, mean included."""
        return self.outer / self.n if self.n else None


def token_rows(t: torch.Tensor, mask: Optional[torch.Tensor], channel_last: bool) -> torch.Tensor:
    """``t`` (channels last) as rows x channels, without padded tokens when ``channel_last`` and ``t`` is
    [batch, tokens, channels] matching ``mask``."""
    if channel_last and mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask.to(t.device).bool()]
    return t.reshape(-1, t.shape[-1])


class _Mask:
    """The attention mask of the batch being run (hooks drop the rows of padded tokens)."""

    current: Optional[torch.Tensor] = None

    @classmethod
    def rows(cls, t: torch.Tensor, channel_last: bool) -> torch.Tensor:
        """``t`` as rows x channels, without padded tokens when ``t`` is [batch, tokens, channels]."""
        return token_rows(t, cls.current, channel_last)


def _patches(conv: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Rows of unfolded input patches of a channel-mode conv, ordered like ``W.reshape(out, -1)``."""
    if isinstance(conv.padding, str):
        return None
    if x.dim() == 3:  # Conv1d as a 1 x k Conv2d
        x = x.unsqueeze(2)
        k, s, p, d = (1, *conv.kernel_size), (1, *conv.stride), (0, *conv.padding), (1, *conv.dilation)
    else:
        k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [B, C*k, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _run(model: nn.Module, inputs: list[Any], hooks: dict[str, Any]) -> None:
    try:
        with forward_hooks(model, hooks), evaluating(model), torch.no_grad():
            for x in inputs:
                _Mask.current = x.get("attention_mask") if isinstance(x, dict) else None
                call_model(model, x)
    finally:
        _Mask.current = None


def input_statistics(model: nn.Module, inputs: list[Any], layers: dict[str, str]) -> dict[str, torch.Tensor]:
    """``name -> statistic`` for ``layers`` (name -> mode): input covariance (Linear, channel conv)
    or token frequencies (Embedding). Spatial convs get none (their strategy falls back to energy)."""
    moments: dict[str, _Moments] = {}
    counts: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name: str):
        def record(module, args, _out):
            x = args[0]
            plain = module.first if isinstance(module, FactorizedLayer) else module
            if isinstance(plain, nn.Embedding):
                ids = x[_Mask.current.bool()] if _Mask.current is not None and \
                    tuple(_Mask.current.shape) == tuple(x.shape) else x
                c = torch.bincount(ids.reshape(-1).cpu(), minlength=plain.num_embeddings).double()
                counts[name] = counts.get(name, 0) + c
            elif isinstance(plain, nn.Linear):
                moments.setdefault(name, _Moments()).add(_Mask.rows(x, True))
            else:
                rows = _patches(plain, x)
                if rows is not None:
                    moments.setdefault(name, _Moments()).add(rows)
        return record

    wanted = {n: hook(n) for n, mode in layers.items() if mode != "spatial" and n in modules}
    _run(model, inputs, wanted)
    stats = {name: m.covariance() for name, m in moments.items() if m.n}
    stats.update({name: c / c.sum() for name, c in counts.items() if float(c.sum()) > 0})
    return stats


def output_covariances(model: nn.Module, names: list[str]) -> tuple[dict[str, _Moments], dict[str, Any]]:
    """Hooks collecting the moments of ``W x`` (bias removed) for Linear / 1x1 conv layers."""
    moments = {name: _Moments() for name in names}

    def hook(name: str):
        def record(module, _args, out):
            channel = -1 if isinstance(module, nn.Linear) else 1
            y = out
            if module.bias is not None:
                shape = [1] * y.dim()
                shape[channel] = -1
                y = y - module.bias.view(shape)
            moments[name].add(_Mask.rows(y.movedim(channel, -1), channel == -1))
        return record

    return moments, {name: hook(name) for name in names}


def collect_output_covariances(model: nn.Module, inputs: list[Any], names: list[str],
                               centered: bool = False) -> dict[str, torch.Tensor]:
    """``name -> E[y y^T]`` (``centered``: the covariance) of ``y = W x`` over the calibration inputs."""
    moments, hooks = output_covariances(model, names)
    _run(model, inputs, hooks)
    return {name: (m.covariance() if centered else m.second_moment()) for name, m in moments.items() if m.n}
