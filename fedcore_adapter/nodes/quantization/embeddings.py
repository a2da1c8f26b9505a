"""int8 embedding tables for ``ptq_dynamic``'s ``allow_emb``: per-row int8 weights, subclasses included.

torch.ao quantizes exact ``nn.Embedding`` / ``nn.EmbeddingBag`` types only, while libraries hold
subclasses: pytorch-lifestream's ``TrxEncoder`` keeps ``NoisyEmbedding``s, which add Gaussian noise
and dropout in training only, so in eval mode they are plain lookups. A subclass is quantized when
its inference *is* its base class's lookup, checked on the module itself (:func:`float_reason`):

- it holds no parameter or buffer besides ``weight`` (an int8 table would drop them);
- in eval mode, on a probe of its rows (up to ``PROBE_ROWS``, the first and last included), its
  forward returns exactly what the base class's forward returns, on two calls.

Anything else stays float and :func:`float_reason` says why (the node lists those layers in its
metrics row's note and in one warning). torch's int8 bag kernel only sums, so an ``EmbeddingBag``
is quantized in ``mode="sum"`` without ``padding_idx`` only (any subclass or not).

The int8 modules keep the float module's ``nn.Embedding`` attributes (``num_embeddings``,
``embedding_dim``, ``padding_idx``, ``max_norm``...), which code such as ptls's ``TrxEncoder``
reads at forward time; a subclass's own attributes are not kept. Their state dict is torch.ao's
(``_packed_params``), so checkpoints written before these classes still load.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.ao.nn.quantized as nnq
from torch import nn
from torch.ao.quantization import float_qparams_weight_only_qconfig

from ...errors import error_line

FLOAT_TYPES = (nn.Embedding, nn.EmbeddingBag)
PROBE_ROWS = 4096
_KEPT = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


class Int8Embedding(nnq.Embedding):
    """torch.ao's int8 embedding, with the float module's ``nn.Embedding`` attributes."""


class Int8EmbeddingBag(nnq.EmbeddingBag):
    """torch.ao's int8 embedding bag (sums), with the float module's ``nn.EmbeddingBag`` attributes."""


def _base(module: nn.Module) -> type:
    return nn.EmbeddingBag if isinstance(module, nn.EmbeddingBag) else nn.Embedding


def int8_embedding(module: nn.Module) -> nn.Module:
    """``module`` (an ``nn.Embedding``/``nn.EmbeddingBag`` or a subclass) as an int8 table with per-row scales."""
    weight = module.weight.detach().cpu().float()
    if _base(module) is nn.Embedding:
        target = Int8Embedding(*weight.shape)
    else:
        target = Int8EmbeddingBag(*weight.shape, mode="sum", include_last_offset=module.include_last_offset)
    observer = float_qparams_weight_only_qconfig.weight()  # what torch.ao's from_float uses: per-row float qparams
    observer(weight)
    scales, zero_points = observer.calculate_qparams()
    target.set_weight(torch.quantize_per_channel(weight, scales.float(), zero_points.float(), 0, torch.quint8))
    for name in _KEPT:
        setattr(target, name, getattr(module, name))
    return target


@torch.no_grad()
def _lookup_mismatch(module: nn.Module, base: type) -> Optional[str]:
    """Why ``module``'s eval forward is not ``base``'s lookup on a probe of its rows, or None when it is."""
    count = module.num_embeddings
    rows = torch.unique(torch.linspace(0, count - 1, min(count, PROBE_ROWS)).round().long())
    indices = rows.unsqueeze(0) if base is nn.Embedding else rows.unsqueeze(1)  # one sequence / one row per bag
    probe = copy.deepcopy(module).cpu().eval()
    try:
        outputs = [probe(indices) for _ in range(2)]
    except Exception as exc:  # noqa: BLE001 - any failure means it is not called as a plain lookup
        return f"its eval forward fails on an index tensor ({error_line(exc, typed=True, limit=200)})"
    expected = base.forward(copy.deepcopy(module).cpu().eval(), indices)
    if not all(isinstance(o, torch.Tensor) and o.shape == expected.shape and torch.equal(o, expected)
               for o in outputs):
        return f"its eval forward is not a plain {base.__name__} lookup (its output differs on the same rows)"
    return None


def float_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` (an ``nn.Embedding``/``nn.EmbeddingBag`` or a subclass) must stay float; None if it can be
    int8."""
    base = _base(module)
    if base is nn.EmbeddingBag and (module.mode != "sum" or module.padding_idx is not None):
        return (f"EmbeddingBag mode={module.mode!r}, padding_idx={module.padding_idx}: torch's int8 bag kernel "
                f"only sums (mode='sum', no padding_idx)")
    if type(module) is base:
        return None
    name = type(module).__name__
    extra = [n for n, _ in [*module.named_parameters(), *module.named_buffers()] if n != "weight"]
    if extra:
        return f"{name} holds {', '.join(extra)} besides weight, which an int8 table would drop"
    mismatch = _lookup_mismatch(module, base)
    return f"{name}: {mismatch}" if mismatch else None
