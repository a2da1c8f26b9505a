"""Per-layer pruning functions beyond torch-pruning's own: recurrent layers (``recurrent``) and "kept whole"."""
from __future__ import annotations

from typing import Optional, Sequence

import torch_pruning as tp
from torch import nn

from .recurrent import RECURRENT_PRUNER, is_recurrent, prunable_recurrent

BasePruningFunc = tp.pruner.function.BasePruningFunc


class FrozenPruner(BasePruningFunc):
    """Makes a layer a leaf of the dependency graph whose channels are never pruned."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise RuntimeError(f"{type(layer).__name__} is kept whole")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> None:
        return None

    def get_in_channels(self, layer: nn.Module) -> None:
        return None


def has_pruner(module: nn.Module) -> bool:
    """Whether the module's channels can be pruned (torch-pruning's functions, or ours for recurrent layers)."""
    if is_recurrent(module):
        return prunable_recurrent(module)
    op = tp.ops.module2type(module)
    return op in tp.pruner.function.PrunerBox and op != tp.ops.OPTYPE.ELEMENTWISE


def pruner_for(module: nn.Module) -> Optional[BasePruningFunc]:
    """The pruning function object used for ``module`` (ours for recurrent layers, else torch-pruning's)."""
    if is_recurrent(module):
        return RECURRENT_PRUNER
    return tp.pruner.function.PrunerBox.get(tp.ops.module2type(module))
