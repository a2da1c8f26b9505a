"""Hidden-unit pruning of recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``) for torch-pruning.

A recurrent layer is one node of the dependency graph. Its output channels are
its output features (``hidden_size`` per direction, forward then reverse); its
input channels are the first layer's inputs. Removing hidden unit ``j`` removes
it from every layer and both directions, since torch keeps one ``hidden_size``
for all of them: the gate rows of ``weight_ih``/``weight_hh``/biases (1, 3 or 4
blocks), the columns of ``weight_hh``, and the next layer's input columns
(``j`` and ``hidden + j`` when bidirectional). Bidirectional layers are pruned
with two channel groups, so both directions lose the same units.

A trainable initial state held beside the layer (ptls ``RnnEncoder.starter_h``,
shaped ``[layers * directions, 1, hidden]``) loses the same units; LSTMs with
``proj_size`` have two hidden axes and are kept whole.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch_pruning as tp
from torch import nn

BasePruningFunc = tp.pruner.function.BasePruningFunc

GATES = {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4}


def is_recurrent(module: nn.Module) -> bool:
    return isinstance(module, nn.RNNBase)


def prunable_recurrent(module: nn.Module) -> bool:
    """A recurrent layer whose hidden units can be removed (not an LSTM with ``proj_size``)."""
    return is_recurrent(module) and getattr(module, "proj_size", 0) == 0 and _gates(module) is not None


def _gates(layer: nn.RNNBase) -> Optional[int]:
    return next((g for cls, g in GATES.items() if isinstance(layer, cls)), None)


def directions(layer: nn.RNNBase) -> int:
    return 2 if layer.bidirectional else 1


def units_of(layer: nn.RNNBase, idxs: Sequence[int]) -> list[int]:
    """The hidden units that output-feature ``idxs`` remove; both directions must lose the same ones."""
    hidden = layer.hidden_size
    per_direction = [sorted({int(i) - d * hidden for i in idxs if d * hidden <= int(i) < (d + 1) * hidden})
                     for d in range(directions(layer))]
    if any(units != per_direction[0] for units in per_direction):
        raise ValueError(f"a bidirectional {type(layer).__name__} must lose the same hidden units in both "
                         f"directions (got {per_direction})")
    return per_direction[0]


def _keep(total: int, removed: Sequence[int]) -> torch.Tensor:
    gone = {int(i) for i in removed}
    return torch.tensor([i for i in range(total) if i not in gone], dtype=torch.long)


def _select(layer: nn.Module, name: str, keep: torch.Tensor, dim: int) -> None:
    param = getattr(layer, name)
    new = nn.Parameter(torch.index_select(param.data, dim, keep.to(param.device)), requires_grad=param.requires_grad)
    if param.grad is not None:
        new.grad = torch.index_select(param.grad, dim, keep.to(param.device))
    setattr(layer, name, new)


def _refresh(layer: nn.RNNBase) -> None:
    """Point the layer's flat weight list (what its kernel reads) at the new parameters."""
    layer._init_flat_weights()


class RecurrentPruner(BasePruningFunc):
    """torch-pruning function for the hidden units (outputs) and inputs of RNN/GRU/LSTM layers."""

    TARGET_MODULES = (nn.RNN, nn.GRU, nn.LSTM)

    def prune_out_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.RNNBase:
        hidden, gates, dirs = layer.hidden_size, _gates(layer), directions(layer)
        keep = _keep(hidden, units_of(layer, idxs))
        rows = torch.cat([keep + g * hidden for g in range(gates)])
        inputs = torch.cat([keep + d * hidden for d in range(dirs)])
        for index in range(layer.num_layers):
            for suffix in ("", "_reverse")[:dirs]:
                tag = f"l{index}{suffix}"
                _select(layer, f"weight_ih_{tag}", rows, 0)
                if index > 0:
                    _select(layer, f"weight_ih_{tag}", inputs, 1)
                _select(layer, f"weight_hh_{tag}", rows, 0)
                _select(layer, f"weight_hh_{tag}", keep, 1)
                if layer.bias:
                    _select(layer, f"bias_ih_{tag}", rows, 0)
                    _select(layer, f"bias_hh_{tag}", rows, 0)
        layer.hidden_size = len(keep)
        _refresh(layer)
        return layer

    def prune_in_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.RNNBase:
        keep = _keep(layer.input_size, idxs)
        for suffix in ("", "_reverse")[:directions(layer)]:
            _select(layer, f"weight_ih_l0{suffix}", keep, 1)
        layer.input_size = len(keep)
        _refresh(layer)
        return layer

    def get_out_channels(self, layer: nn.RNNBase) -> Optional[int]:
        return layer.hidden_size * directions(layer) if prunable_recurrent(layer) else None

    def get_in_channels(self, layer: nn.RNNBase) -> Optional[int]:
        return layer.input_size if prunable_recurrent(layer) else None


RECURRENT_PRUNER = RecurrentPruner()


def initial_state_parameters(model: nn.Module) -> dict[str, str]:
    """``{parameter name: recurrent layer name}`` for trainable initial states held beside a recurrent layer.

    A raw parameter of a module whose direct child is a prunable recurrent layer, shaped
    ``[layers * directions, *, hidden]`` (ptls ``RnnEncoder.starter_h``), is that layer's
    initial hidden state: it loses the layer's removed units along its last axis.
    """
    found = {}
    for owner_name, owner in model.named_modules():
        rnns = {n: m for n, m in owner.named_children() if prunable_recurrent(m)}
        for pname, param in owner.named_parameters(recurse=False):
            for child_name, rnn in rnns.items():
                if param.dim() == 3 and param.shape[0] == rnn.num_layers * directions(rnn) \
                        and param.shape[-1] == rnn.hidden_size:
                    prefix = f"{owner_name}." if owner_name else ""
                    found[f"{prefix}{pname}"] = f"{prefix}{child_name}"
                    break
    return found


SIZE_ATTRIBUTES = ("hidden_size", "embedding_size", "full_hidden_size")  # the last counts every direction


def owner_sizes(owner: nn.Module, layer: nn.RNNBase, removed: int) -> dict[str, int]:
    """Plain int attributes of the module holding ``layer`` that state its hidden size (``hidden_size``,
    ``embedding_size``; ``full_hidden_size`` counts both directions), updated for ``removed`` units."""
    out = {}
    for key in SIZE_ATTRIBUTES:
        factor = directions(layer) if key == "full_hidden_size" else 1
        if type(vars(owner).get(key)) is int and vars(owner)[key] == layer.hidden_size * factor:
            out[key] = (layer.hidden_size - removed) * factor
    return out


def unit_magnitudes(layer: nn.RNNBase, p: float) -> torch.Tensor:
    """Per output feature (direction-major): the Lp mass of its unit's own weights in every layer -- its gate
    rows of ``weight_ih``/``weight_hh``/biases and its ``weight_hh`` column -- to the power ``1/p``."""
    hidden, gates, dirs = layer.hidden_size, _gates(layer), directions(layer)
    mass = torch.zeros(dirs, hidden)
    for index in range(layer.num_layers):
        for d, suffix in enumerate(("", "_reverse")[:dirs]):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                param = getattr(layer, f"{name}_l{index}{suffix}", None)
                if param is None:
                    continue
                rows = param.detach().abs().float().pow(p).reshape(gates, hidden, -1)
                mass[d] += rows.sum(dim=(0, 2)).cpu()
            mass[d] += getattr(layer, f"weight_hh_l{index}{suffix}").detach().abs().float().pow(p).sum(0).cpu()
    return mass.reshape(-1).pow(1 / p)


class RecurrentMagnitude(tp.importance.Importance):
    """Magnitude importance that also weighs a recurrent layer's units by their own weights.

    torch-pruning scores a group by the weights of the layers it knows; for a group rooted at a
    GRU/LSTM that is only the next layer's input columns (a classifier's few rows). The unit's own
    gate weights are added, both scores mean-normalised, so a unit that never moves counts as such.
    """

    def __init__(self, base: tp.importance.Importance, p: float):
        self.base, self.p = base, p

    def __call__(self, group) -> Optional[torch.Tensor]:
        imp = self.base(group)
        root, handler = group[0].dep.target.module, group[0].dep.handler
        if not prunable_recurrent(root) or handler != RECURRENT_PRUNER.prune_out_channels:
            return imp
        own = unit_magnitudes(root, self.p)
        own = own / own.mean().clamp_min(1e-12)
        if imp is None or imp.shape != own.shape:
            return own
        imp = imp.float().cpu()
        return (imp / imp.mean().clamp_min(1e-12) + own).to(imp.device)
