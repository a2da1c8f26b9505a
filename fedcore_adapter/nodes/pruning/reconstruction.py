"""Post-training reconstruction of pruned models: each layer that lost input channels (the consumer) is
re-fitted by least squares so its outputs on calibration batches match the unpruned model's.

Removing heads or FFN channels deletes input columns of one linear (``attention.output.dense``,
``output.dense``, ``linear2``). Its remaining weights and bias can then be solved for in closed form: with
``H`` the consumer's inputs in the model pruned so far and ``Y`` its outputs in the unpruned model (both on
the same calibration tokens, padding excluded), the kept columns take ``argmin ||Y - W H - b||²`` (damped).
Groups are done in model order, so each fit also absorbs the error of the blocks before it. The same
statistics rank units by the error their removal leaves after the re-fit (optimal brain surgeon, one unit
at a time with the inverse updated): ``importance: obs``. This is the layer-wise reconstruction of Kwon et
al., "A Fast Post-Training Pruning Framework for Transformers" (2022) and ZipLM (2023), without training.

Models pruned through torch-pruning's graph (CNNs, MLPs) re-fit every Linear and (ungrouped, zero-padded)
Conv1d / Conv2d whose inputs lost channels, in model order, against the model as it entered the step (a
convolution's rows are its input patches, as in ThiNet / He et al. 2017's channel pruning).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from ...data import call_model
from ..toolkit import evaluating, forward_hooks

DAMPING = 1e-3  # added to the Gram matrix's diagonal, relative to its mean (GPTQ-style)


class _Reached(Exception):
    """Stops a forward pass once the consumer has run (the layers after it are not needed)."""


@dataclass
class LayerStats:
    """Gram matrix ``G = [H 1]ᵀ[H 1]`` of a consumer's inputs and ``C = [H 1]ᵀ Y`` with the reference outputs
    (float64; the last row / column is the bias's constant input)."""

    gram: torch.Tensor
    cross: torch.Tensor
    tokens: int

    def damped(self, cols: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(cols + [self.gram.shape[0] - 1], device=self.gram.device)
        g = self.gram[idx][:, idx]
        g = g + DAMPING * torch.diagonal(g).mean().clamp_min(1e-12) * torch.eye(len(idx), dtype=g.dtype,
                                                                                 device=g.device)
        return g, self.cross[idx]


def _rows(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``x``'s feature rows, the padded positions left out when ``mask`` matches its leading dimensions (a nested
    tensor holds no padding)."""
    if x.is_nested:
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in x.unbind()])
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _mask(inputs: Any) -> Optional[torch.Tensor]:
    """The real positions of a batch: a Hugging Face ``attention_mask``, a ptls ``PaddedBatch``'s lengths."""
    if isinstance(inputs, dict):
        return inputs.get("attention_mask")
    return getattr(inputs, "seq_len_mask", None)


@contextmanager
def _unfused() -> Iterator[None]:
    """PyTorch's fused transformer fast path off (it runs ``nn.TransformerEncoderLayer`` without calling its
    linears, so their hooks would see nothing)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def refittable(layer: nn.Module) -> bool:
    """A Linear, or a Conv1d / Conv2d without groups and with numeric zero padding (patches unfold exactly)."""
    if isinstance(layer, nn.Linear):
        return True
    return (isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups == 1 and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str))


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as the rows its weight multiplies: ``[..., in]`` for a Linear, ``[N, positions,
    in_channels * kernel]`` for a convolution (``F.unfold``'s channel-major order, the weight's flattened order)."""
    if isinstance(layer, nn.Linear):
        return x
    one_d = isinstance(layer, nn.Conv1d)

    def pair(v: tuple, unit: int) -> tuple:  # a Conv1d as a Conv2d of height 1
        return (unit, v[0]) if one_d else tuple(v)

    x = x.unsqueeze(-2) if one_d else x
    cols = torch.nn.functional.unfold(x, pair(layer.kernel_size, 1), dilation=pair(layer.dilation, 1),
                                      padding=pair(layer.padding, 0), stride=pair(layer.stride, 1))
    return cols.transpose(1, 2)


def _outputs(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer's output with the channels last (``[N, positions, out]`` for a convolution)."""
    return y if isinstance(layer, nn.Linear) else y.flatten(2).transpose(1, 2)


@torch.no_grad()
def _capture(model: nn.Module, name: str, inputs: Any, want: str) -> torch.Tensor:
    """The input (``want='in'``) or output of layer ``name`` on ``inputs``; the forward stops there."""
    got: list[torch.Tensor] = []

    def hook(module, args, output):
        got.append(args[0] if want == "in" else output)
        raise _Reached

    try:
        with forward_hooks(model, {name: hook}):
            call_model(model, inputs)
    except _Reached:
        pass
    if not got:
        raise RuntimeError(f"layer {name!r} did not run on a calibration batch")
    return got[0]


@torch.no_grad()
def layer_stats(model: nn.Module, reference: nn.Module, name: str, calibration: Iterable[Any],
                outputs: Optional[list[int]] = None) -> LayerStats:
    """Statistics of consumer ``name``: its inputs in ``model``, its outputs in ``reference`` (the same model
    inputs, on the models' device; only the ``outputs`` channels the consumer kept, when it lost some too)."""
    layer, ref_layer = model.get_submodule(name), reference.get_submodule(name)
    gram = cross = None
    tokens = 0
    with evaluating(model, reference):
        for inputs in calibration:
            mask = _mask(inputs)
            with _unfused():
                h = _rows(_patches(layer, _capture(model, name, inputs, "in")), mask).double()
                y = _rows(_outputs(ref_layer, _capture(reference, name, inputs, "out")), mask).double()
            if outputs is not None:
                y = y[:, outputs]
            h = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype, device=h.device)], 1)
            gram = h.T @ h if gram is None else gram.add_(h.T @ h)
            cross = h.T @ y if cross is None else cross.add_(h.T @ y)
            tokens += len(h)
    if gram is None:
        raise ValueError("reconstruction needs calibration batches, and none were given")
    return LayerStats(gram, cross, tokens)


def obs_choice(stats: LayerStats, unit_size: int, remove: int) -> list[int]:
    """``remove`` units (of ``unit_size`` adjacent inputs) chosen one at a time, each the one whose removal
    leaves the least output error once the rest are re-fitted (block OBS with the inverse updated)."""
    n = stats.gram.shape[0] - 1
    units = n // unit_size
    g, c = stats.damped(list(range(n)))
    hinv = torch.linalg.inv(g)
    w = hinv @ c  # the re-fitted weights, one row per input (+ the bias last)
    alive = torch.ones(units, dtype=torch.bool)
    cols = torch.arange(n, device=g.device).view(units, unit_size)
    removed: list[int] = []
    for _ in range(remove):
        live = torch.nonzero(alive).flatten()
        idx = cols[live]
        h_blocks = hinv[idx[:, :, None], idx[:, None, :]]
        w_blocks = w[idx]
        err = (w_blocks * torch.linalg.solve(h_blocks, w_blocks)).sum((1, 2))
        pick = int(live[int(torch.argmin(err))])
        s = cols[pick]
        inv_ss = torch.linalg.inv(hinv[s][:, s])
        w = w - hinv[:, s] @ inv_ss @ w[s]
        hinv = hinv - hinv[:, s] @ inv_ss @ hinv[s]
        alive[pick] = False
        removed.append(pick)
    return removed


@torch.no_grad()
def refit_consumer(layer: nn.Module, stats: LayerStats, kept_cols: Optional[list[int]] = None) -> None:
    """Set ``layer`` (already holding only ``kept_cols`` of the statistics' inputs; None: all of them) to the
    damped least-squares fit."""
    g, c = stats.damped(list(range(stats.gram.shape[0] - 1)) if kept_cols is None else kept_cols)
    if layer.bias is None:  # no bias to absorb the mean: fit without the constant input
        weight = torch.linalg.solve(g[:-1, :-1], c[:-1]).T
    else:
        solution = torch.linalg.solve(g, c)  # [kept + 1, out]
        weight = solution[:-1].T
        layer.bias.copy_(solution[-1].to(layer.bias.dtype))
    layer.weight.copy_(weight.reshape(layer.weight.shape).to(layer.weight.dtype))


@dataclass
class Reconstruction:
    """What re-fitting needs: the unpruned model (the reference outputs) and calibration model inputs
    (``toolkit.input_batches``: targets dropped, on the model's device)."""

    reference: nn.Module
    inputs: list

    def stats(self, model: nn.Module, consumer: str, reference: Optional[nn.Module] = None,
              outputs: Optional[list[int]] = None) -> LayerStats:
        return layer_stats(model, self.reference if reference is None else reference, consumer, self.inputs,
                           outputs)
