"""A module's own objective: Lightning / ptls modules that define their steps are trained and evaluated on them.

:func:`own_step` tells which step a module defines:

- ``shared_step`` (ptls ``ABSModule``: ``CoLESModule``, ...): ``shared_step(x, y) -> (y_hat, y)``,
  head included; the loss is the task loss (``model._loss`` / ``model.loss``, as the seed
  finds it) on ``(y_hat, y)`` — exactly what ptls's ``training_step`` computes.
- ``training_step`` (any Lightning module, ptls ``SequenceToTarget``): its returned loss
  (a tensor or ``{"loss": ...}``).

Evaluation runs the module's ``validation_step`` over the data and then its
``on_validation_epoch_end``; what the latter logs (ptls ``valid_metrics``, torchmetrics)
are the quality columns (``valid/recall_top_k`` -> ``recall_top_k``). No generic
``accuracy`` is computed for such modules (a CoLES embedding has no classes): it is
reported only when the module logs one itself.
``self.log`` calls are captured, so no Lightning ``Trainer`` is needed.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .data import batch_size, call_model, limited, primary_output, seeded, split_batch, to_device
from .errors import DataError

LOG_PREFIXES = ("valid/", "validation/", "val/", "valid_", "val_")


def _defined(model: nn.Module, name: str) -> bool:
    """True when ``model``'s class defines ``name`` itself (Lightning's own placeholders do not count)."""
    fn = getattr(type(model), name, None)
    if not callable(fn):
        return False
    module = getattr(fn, "__module__", "") or ""
    return not module.startswith(("lightning.", "pytorch_lightning."))


def own_step(model: nn.Module) -> Optional[str]:
    """``'shared_step'``, ``'training_step'`` or None: the step ``model`` defines, in that order of preference."""
    for name in ("shared_step", "training_step"):
        if _defined(model, name):
            return name
    return None


def join_batch(inputs: Any, target: Any) -> Any:
    """The batch ``split_batch`` took apart: ``(inputs, target)`` (``(*inputs, target)``), or ``inputs`` alone."""
    if target is None:
        return inputs
    return (*inputs, target) if isinstance(inputs, tuple) else (inputs, target)


def step_output(model: nn.Module, inputs: Any, target: Any) -> tuple[torch.Tensor, Any]:
    """``(output, target)`` as the module's objective sees them: ``shared_step`` (head included), else
    ``model(inputs)``."""
    if _defined(model, "shared_step"):
        args = (*inputs, target) if isinstance(inputs, tuple) else (inputs, target)
        out, target = model.shared_step(*args)
        return primary_output(out), target
    return primary_output(call_model(model, inputs)), target


def _logged_value(value: Any) -> Any:
    if hasattr(value, "compute") and callable(value.compute):  # a torchmetrics Metric logged as an object
        value = value.compute()
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean()) if value.numel() else None
    return float(value) if isinstance(value, (int, float)) else None


@contextmanager
def captured_logs(model: nn.Module) -> Iterator[dict]:
    """Within the block, ``model.log(name, value)`` / ``model.log_dict(...)`` record into the yielded dict."""
    logged: dict[str, Any] = {}
    saved = {k: model.__dict__[k] for k in ("log", "log_dict") if k in model.__dict__}
    object.__setattr__(model, "log", lambda name, value, *a, **k: logged.__setitem__(name, value))
    object.__setattr__(model, "log_dict", lambda values, *a, **k: logged.update(values))
    try:
        yield logged
    finally:
        for key in ("log", "log_dict"):
            model.__dict__.pop(key, None)
        model.__dict__.update(saved)


def reset_metrics(model: nn.Module) -> None:
    """Reset every torchmetrics ``Metric`` the module holds (steps called outside a Trainer accumulate in them)."""
    if "torchmetrics" not in sys.modules:
        return
    from torchmetrics import Metric  # lazy: torchmetrics takes seconds; a model holding metrics has imported it

    for module in model.modules():
        if isinstance(module, Metric):
            module.reset()


def step_loss(model: nn.Module, inputs: Any, target: Any, loss_fn: Optional[Callable], index: int = 0) -> torch.Tensor:
    """The module's own loss on a batch (see the module docstring)."""
    if _defined(model, "shared_step"):
        out, target = step_output(model, inputs, target)
        fn = loss_fn or getattr(model, "_loss", None) or getattr(model, "loss", None)
        return fn(out, target)
    with captured_logs(model):
        result = model.training_step(join_batch(inputs, target), index)
    loss = result.get("loss") if isinstance(result, dict) else result
    if not isinstance(loss, torch.Tensor):
        raise DataError(f"{type(model).__name__}.training_step returned {type(result).__name__}; "
                        f"it must return the loss tensor or a dict with 'loss'")
    return loss


def _column(name: str) -> str:
    for prefix in LOG_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def evaluate_steps(model: nn.Module, loader: Any, loss_fn: Optional[Callable], device: torch.device,
                   limit_batches: Optional[int] = None, seed: int = 0) -> dict[str, Optional[float]]:
    """Mean own loss over labeled batches, ``accuracy`` None, and the module's own validation metrics."""
    was_training = model.training
    model.eval()
    reset_metrics(model)
    loss_sum, seen = 0.0, 0
    metrics: dict[str, Optional[float]] = {}
    try:
        with torch.no_grad(), captured_logs(model) as logged, seeded(seed):
            for index, batch in enumerate(limited(loader, limit_batches)):
                batch = to_device(batch, device)
                inputs, target = split_batch(batch)
                if target is None:
                    continue
                n = batch_size(inputs)
                loss_sum += float(step_loss(model, inputs, target, loss_fn, index)) * n
                seen += n
                if _defined(model, "validation_step"):
                    model.validation_step(batch, index)
            logged.clear()
            if seen and _defined(model, "on_validation_epoch_end"):
                model.on_validation_epoch_end()
            for name, value in logged.items():
                column = _column(name)
                if column != "loss":
                    metrics[column] = _logged_value(value)
    finally:
        reset_metrics(model)
        model.train(was_training)
    return {"loss": loss_sum / seen if seen else None, "accuracy": metrics.pop("accuracy", None), **metrics}
