"""Choosing the structured-pruning backend, example inputs, and Taylor gradient calibration."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from ...data import batch_size, call_model, first_batch, primary_output, split_batch, to_device
from ...steps import own_step, step_loss
from .padded import is_padded, padded_slice
from .reconstruction import Reconstruction
from .structured import GraphPruner, Ratio
from .transformers import TransformerPruner, find_groups

Pruner = Union[GraphPruner, TransformerPruner]


def make_pruner(model: nn.Module, example_inputs: Any, *, label: str, ratio: Ratio, steps: int = 1,
                head_ratio: Optional[float] = None, importance: str = "magnitude", importance_norm: float = 2.0,
                global_pruning: bool = False, round_to: Optional[int] = None,
                ignored_layers: Iterable[str] = (), schedule: str = "linear",
                reconstruction: Optional[Reconstruction] = None) -> Pruner:
    """A pruner for ``model`` (changed in place by its ``step``): heads + FFN for transformer encoders,
    torch-pruning's dependency graph otherwise. Validates everything before anything is removed.
    ``reconstruction``: re-fit the layers that lost input channels by least squares."""
    common = dict(label=label, ratio=ratio, steps=steps, importance=importance, importance_norm=importance_norm,
                  global_pruning=global_pruning, round_to=round_to, ignored_layers=tuple(ignored_layers),
                  schedule=schedule)
    groups = find_groups(model)
    if groups:
        return TransformerPruner(model, groups, head_ratio=head_ratio, reconstruction=reconstruction, **common)
    return GraphPruner(model, example_inputs, reconstruction=reconstruction, **common)


def slice_inputs(inputs: Any, n: int) -> Any:
    """The first ``n`` samples of a batch's inputs (tensor, tuple, dict or ptls PaddedBatch)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:n]
    if is_padded(inputs):
        return padded_slice(inputs, n)
    if isinstance(inputs, dict):
        return {k: slice_inputs(v, n) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(slice_inputs(v, n) for v in inputs)
    return inputs


def example_inputs(loader: Any, device: torch.device, n: int = 2) -> Any:
    """A few samples of the first batch, for tracing the model."""
    inputs, _ = split_batch(to_device(first_batch(loader, "training loader"), device))
    if is_padded(inputs):
        inputs = inputs.to(device)
    return slice_inputs(inputs, min(n, len(inputs) if is_padded(inputs) else batch_size(inputs)))


def calibration_loss(output: Any, target: Optional[torch.Tensor], loss_fn: Optional[Callable]) -> torch.Tensor:
    """Task loss on labeled batches; on unlabeled ones half the mean squared output (its energy)."""
    out = primary_output(output)
    if target is not None and loss_fn is not None:
        return loss_fn(out, target)
    return 0.5 * out.float().pow(2).mean()


def accumulate_gradients(model: nn.Module, batches: Iterable[Any], loss_fn: Optional[Callable],
                         device: torch.device) -> int:
    """Fill ``.grad`` with the gradient summed over ``batches`` (Taylor importance); returns batches used.

    A module defining its own step is differentiated through it (``steps.step_loss``: its head included)."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    used = 0
    with torch.enable_grad():
        for batch in batches:
            inputs, target = split_batch(to_device(batch, device))
            if target is not None and own_step(model) is not None:  # ptls / Lightning: the module's own loss
                step_loss(model, inputs, target, loss_fn).backward()
            else:
                calibration_loss(call_model(model, inputs), target, loss_fn).backward()
            used += 1
    model.train(was_training)
    return used
