"""The shared training loop: the training node and every fine-tune (pruning, low-rank, QAT) use it.

On labeled batches the loss is the task loss (or ``custom_loss``); on
unlabeled batches the model learns by distillation from ``ctx.teacher``.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .context import NodeContext
from .data import call_model, limited, primary_output, split_batch, to_device, batch_size
from .errors import DataError, NodeError
from .losses import distillation_mse, instantiate_loss, token_mask
from .metrics import evaluate
from .schema import TrainParams

Regularizer = Callable[[nn.Module], torch.Tensor]
Objective = Callable[[nn.Module, object, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class TrainReport:
    epochs_run: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)


def make_optimizer(params: TrainParams, model: nn.Module) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise NodeError("training", "the model has no trainable parameters")
    if params.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=params.learning_rate, momentum=params.momentum,
                               weight_decay=params.weight_decay)
    cls = torch.optim.AdamW if params.optimizer == "adamw" else torch.optim.Adam
    return cls(trainable, lr=params.learning_rate, weight_decay=params.weight_decay)


def default_objective(teacher: nn.Module, task_loss: Callable) -> Objective:
    """Task loss on labeled batches; MSE to the teacher's output on unlabeled ones (padding masked out)."""

    def objective(model: nn.Module, inputs, target: Optional[torch.Tensor]) -> torch.Tensor:
        out = primary_output(call_model(model, inputs))
        if target is not None:
            return task_loss(out, target)
        with torch.no_grad():
            teacher_out = primary_output(call_model(teacher, inputs))
        return distillation_mse(out, teacher_out, token_mask(inputs))

    return objective


def _improved(monitor: str, value: Optional[float], best: Optional[float], min_delta: float) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    return value < best - min_delta if monitor == "val_loss" else value > best + min_delta


def train(model: nn.Module, ctx: NodeContext, params: TrainParams, *, regularizer: Optional[Regularizer] = None,
          tag: str = "train", objective: Optional[Objective] = None) -> TrainReport:
    """Train ``model`` in place for ``params.epochs``; returns the per-epoch history.

    ``objective(model, inputs, target)`` replaces the default batch loss (task
    loss, or distillation from ``ctx.teacher`` on unlabeled batches);
    ``regularizer(model)`` is added to every batch loss (e.g. low-rank Hoyer and
    orthogonality terms). Early stopping restores the best weights.
    """
    report = TrainReport()
    if params.epochs == 0:
        return report
    device = ctx.device
    model.to(device)
    teacher = ctx.teacher.to(device).eval()
    task_loss = instantiate_loss(params.custom_loss) if params.custom_loss else ctx.loss_fn
    objective = objective or default_objective(teacher, task_loss)
    optimizer = make_optimizer(params, model)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)
                 if params.scheduler == "cosine" else None)
    limit_train = ctx.limit("train", params.limit_train_batches)
    limit_valid = ctx.limit("valid", params.limit_valid_batches)
    stop = params.early_stopping
    best_value, best_state, bad_epochs = None, None, 0
    label = ctx.node_label or tag

    from tqdm.auto import tqdm

    for epoch in range(params.epochs):
        model.train()
        total, seen, start = 0.0, 0, time.perf_counter()
        bar = tqdm(limited(ctx.train_loader, limit_train), desc=f"{label} epoch {epoch + 1}/{params.epochs}",
                   total=limit_train, leave=False, disable=not params.progress or not sys.stderr.isatty(),
                   unit="batch")
        for step, batch in enumerate(bar):
            inputs, target = split_batch(to_device(batch, device))
            loss = objective(model, inputs, target)
            if regularizer is not None:
                loss = loss + regularizer(model)
            if not torch.isfinite(loss):
                raise NodeError(label, f"loss became {loss.item()} at epoch {epoch + 1}, batch {step + 1}; "
                                       f"lower learning_rate (now {params.learning_rate}) or set grad_clip")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if params.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            optimizer.step()
            n = batch_size(inputs)
            total += loss.item() * n
            seen += n
            bar.set_postfix(loss=f"{total / seen:.4f}", sps=f"{seen / (time.perf_counter() - start):.0f}")
        if seen == 0:
            raise DataError("train_dataloader() yielded no batches; the training set is empty")
        if scheduler is not None:
            scheduler.step()
        row = {"train_loss": total / seen, "epoch_s": time.perf_counter() - start}
        val = evaluate(model, ctx.val_loader, task_loss, device, limit_valid) if ctx.val_loader is not None else {}
        row.update({f"val_{k}": v for k, v in val.items() if v is not None})
        report.history.append({"epoch": epoch + 1, **row})
        report.epochs_run = epoch + 1
        ctx.log({f"{tag}_{k}" if tag != "train" else k: v for k, v in row.items()}, epoch + 1)
        if ctx.common.save_each > 0 and (epoch + 1) % ctx.common.save_each == 0:
            ctx.save_intermediate(model, f"epoch_{epoch + 1:04d}")
        if stop is not None:
            value = row.get(stop.monitor)
            if _improved(stop.monitor, value, best_value, stop.min_delta):
                best_value, best_state, bad_epochs = value, copy.deepcopy(model.state_dict()), 0
            else:
                bad_epochs += 1
                if bad_epochs >= stop.patience:
                    report.stopped_early = True
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return report
