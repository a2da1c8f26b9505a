"""Per-layer pruning functions beyond torch-pruning's own: a correct LSTM one and a "kept whole" one."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch_pruning as tp
from torch import nn

BasePruningFunc = tp.pruner.function.BasePruningFunc


def lstm_is_prunable(layer: nn.LSTM) -> bool:
    """Single-layer, unidirectional, unprojected LSTMs have a plain hidden-channel axis."""
    return layer.num_layers == 1 and not layer.bidirectional and layer.proj_size == 0


def _select(param: nn.Parameter, keep: torch.Tensor, dim: int) -> nn.Parameter:
    new = nn.Parameter(torch.index_select(param.data, dim, keep.to(param.device)), requires_grad=param.requires_grad)
    if param.grad is not None:
        new.grad = torch.index_select(param.grad, dim, keep.to(param.device))
    return new


def _keep(total: int, idxs: Sequence[int]) -> torch.Tensor:
    removed = set(int(i) for i in idxs)
    return torch.tensor([i for i in range(total) if i not in removed], dtype=torch.long)


class LSTMPruner(BasePruningFunc):
    """Hidden channels of a single-layer LSTM: the four gate blocks of every weight and bias lose the same rows.

    (torch-pruning 1.6's own LSTM function slices the gate matrices along the wrong axes.)
    """

    TARGET_MODULES = nn.LSTM

    def prune_out_channels(self, layer: nn.LSTM, idxs: Sequence[int]) -> nn.LSTM:
        hidden = layer.hidden_size
        keep = _keep(hidden, idxs)
        gates = torch.cat([keep + g * hidden for g in range(4)])
        layer.weight_ih_l0 = _select(layer.weight_ih_l0, gates, 0)
        layer.weight_hh_l0 = _select(_select(layer.weight_hh_l0, gates, 0), keep, 1)
        if layer.bias:
            layer.bias_ih_l0 = _select(layer.bias_ih_l0, gates, 0)
            layer.bias_hh_l0 = _select(layer.bias_hh_l0, gates, 0)
        layer.hidden_size = len(keep)
        layer._flat_weights = [getattr(layer, n) for n in layer._flat_weights_names]
        return layer

    def prune_in_channels(self, layer: nn.LSTM, idxs: Sequence[int]) -> nn.LSTM:
        layer.weight_ih_l0 = _select(layer.weight_ih_l0, _keep(layer.input_size, idxs), 1)
        layer.input_size -= len(idxs)
        layer._flat_weights = [getattr(layer, n) for n in layer._flat_weights_names]
        return layer

    def get_out_channels(self, layer: nn.LSTM) -> Optional[int]:
        return layer.hidden_size if lstm_is_prunable(layer) else None

    def get_in_channels(self, layer: nn.LSTM) -> Optional[int]:
        return layer.input_size if lstm_is_prunable(layer) else None


class FrozenPruner(BasePruningFunc):
    """Makes a layer a leaf of the dependency graph whose channels are never pruned."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise RuntimeError(f"{type(layer).__name__} is kept whole")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> None:
        return None

    def get_in_channels(self, layer: nn.Module) -> None:
        return None


LSTM_PRUNER = LSTMPruner()


def has_pruner(module: nn.Module) -> bool:
    """Whether the module's channels can be pruned (torch-pruning's functions, or ours for LSTM)."""
    if isinstance(module, nn.LSTM):
        return lstm_is_prunable(module)
    op = tp.ops.module2type(module)
    return op in tp.pruner.function.PrunerBox and op != tp.ops.OPTYPE.ELEMENTWISE


def pruner_for(module: nn.Module) -> Optional[BasePruningFunc]:
    """The pruning function object used for ``module`` (ours for LSTM, else torch-pruning's)."""
    if isinstance(module, nn.LSTM):
        return LSTM_PRUNER
    return tp.pruner.function.PrunerBox.get(tp.ops.module2type(module))
