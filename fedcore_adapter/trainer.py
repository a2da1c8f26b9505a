"""The shared training loop: the training node and every fine-tune (pruning, low-rank, QAT) use it.

On labeled batches the loss is the task loss (or ``custom_loss``); on
unlabeled batches the model learns by distillation from ``ctx.teacher``
(``unlabeled_loss``: output MSE, or the cosine of mean-pooled outputs).
A module that defines its own step (ptls ``shared_step``, Lightning
``training_step``) learns on it instead, head included (see ``steps``).

Recovery fine-tunes (``recovery=True`` or a ``node_input``, the model as it entered
a compression node) never end worse on validation than they started
(``keep_best: auto``: the starting weights are restored when they score higher
than the last epoch; ``true``: the best epoch, start included); with ``distill``
they also distil from ``node_input`` on labeled batches (``distill_weight``,
``temperature``).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .context import NodeContext
from .data import call_model, primary_output, split_batch, to_device, batch_size
from .errors import DataError, NodeError
from .losses import distillation_mse, instantiate_loss, labeled_distillation, token_mask, unlabeled_distillation
from .metrics import evaluate
from .progress import batch_bar, epoch_bar
from .steps import own_step, reset_metrics, step_loss, step_output
from .schema import TrainParams
from .training_cache import loader_generators, set_random_state

REUSED = "reused_epochs"  # logged (with the last epoch's metrics) when a training is restored, not run
Regularizer = Callable[[nn.Module], torch.Tensor]
Objective = Callable[[nn.Module, object, Optional[torch.Tensor]], torch.Tensor]
Comparison = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]  # (student, teacher, mask)


@dataclass
class TrainReport:
    epochs_run: int = 0
    stopped_early: bool = False
    best_epoch: Optional[int] = None  # keep_best: the epoch whose weights were kept (0: the starting ones)
    history: list[dict] = field(default_factory=list)


def make_optimizer(params: TrainParams, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters; a parameter with an ``lr_scale``
    attribute (e.g. a learned quantization scale) trains at ``learning_rate * lr_scale``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise NodeError("training", "the model has no trainable parameters")
    scales = sorted({float(getattr(p, "lr_scale", 1.0)) for p in trainable}, reverse=True)
    groups = [{"params": [p for p in trainable if float(getattr(p, "lr_scale", 1.0)) == scale],
               "lr": params.learning_rate * scale} for scale in scales]
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.learning_rate, momentum=params.momentum,
                               weight_decay=params.weight_decay)
    cls = torch.optim.AdamW if params.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=params.learning_rate, weight_decay=params.weight_decay)


def unlabeled_comparison(params: TrainParams) -> Comparison:
    """How unlabeled batches are compared with the teacher: ``params.unlabeled_loss`` (and its MSE weight)."""
    loss, mse_weight = params.unlabeled_loss, params.unlabeled_mse_weight
    return lambda out, reference, mask: unlabeled_distillation(out, reference, mask, loss, mse_weight)


def default_objective(teacher: nn.Module, task_loss: Callable, distill_from: Optional[nn.Module] = None,
                      weight: float = 0.5, temperature: float = 4.0,
                      unlabeled: Comparison = distillation_mse) -> Objective:
    """Task loss on labeled batches; ``unlabeled`` (default: MSE, padding masked out) to ``teacher``'s output
    on unlabeled ones.

    With ``distill_from``, labeled batches mix in distillation from it:
    ``(1 - weight) * task + weight * T^2 KL`` (soft targets; output MSE for real-valued targets).
    """

    def objective(model: nn.Module, inputs, target: Optional[torch.Tensor]) -> torch.Tensor:
        out = primary_output(call_model(model, inputs))
        if target is None:
            with torch.no_grad():
                teacher_out = primary_output(call_model(teacher, inputs))
            return unlabeled(out, teacher_out, token_mask(inputs))
        loss = task_loss(out, target)
        if distill_from is None or weight == 0:
            return loss
        with torch.no_grad():
            soft = primary_output(call_model(distill_from, inputs))
        return (1 - weight) * loss + weight * labeled_distillation(out, soft, target, temperature)

    return objective


def module_objective(teacher: nn.Module, task_loss: Optional[Callable], distill_from: Optional[nn.Module] = None,
                     weight: float = 0.5, unlabeled: Comparison = distillation_mse) -> Objective:
    """The module's own step loss (``steps.step_loss``) on labeled batches; ``unlabeled`` (default: output MSE)
    to ``teacher``'s step output on unlabeled ones. With ``distill_from``: ``(1 - weight) * own + weight * MSE``
    of the step outputs (a module's output may be an embedding, so no soft-label KL)."""
    calls = [0]

    def objective(model: nn.Module, inputs, target: Optional[torch.Tensor]) -> torch.Tensor:
        index, calls[0] = calls[0], calls[0] + 1
        if target is None:
            with torch.no_grad():
                reference = step_output(teacher, inputs, None)[0]
            return unlabeled(step_output(model, inputs, None)[0], reference, token_mask(inputs))
        loss = step_loss(model, inputs, target, task_loss, index)
        if distill_from is None or weight == 0:
            return loss
        with torch.no_grad():
            reference = step_output(distill_from, inputs, target)[0]
        return (1 - weight) * loss + weight * distillation_mse(step_output(model, inputs, target)[0], reference)

    return objective


def _resolve(option, recovery: bool) -> bool:
    """``auto`` options are on in recovery fine-tunes, off elsewhere."""
    return recovery if option == "auto" else bool(option)


def _improved(monitor: str, value: Optional[float], best: Optional[float], min_delta: float) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    return value < best - min_delta if monitor == "val_loss" else value > best + min_delta


def _score(row: dict) -> Optional[tuple]:
    """What ``keep_best`` maximises: validation accuracy (ties: lower loss), else minus the validation loss."""
    if row.get("val_accuracy") is not None:
        return row["val_accuracy"], -row.get("val_loss", 0.0)
    return (-row["val_loss"],) if row.get("val_loss") is not None else None


def _validate(model: nn.Module, ctx: NodeContext, task_loss: Callable, device, limit: Optional[int]) -> dict:
    if ctx.val_loader is None:
        return {}
    val = evaluate(model, ctx.val_loader, task_loss, device, limit, seed=ctx.common.seed, original=ctx.teacher)
    return {f"val_{k}": v for k, v in val.items() if v is not None}


def train(model: nn.Module, ctx: NodeContext, params: TrainParams, *, regularizer: Optional[Regularizer] = None,
          tag: str = "train", objective: Optional[Objective] = None,
          node_input: Optional[nn.Module] = None, recovery: bool = False,
          reuse_key: Optional[Mapping[str, Any]] = None) -> TrainReport:
    """Train ``model`` in place for ``params.epochs``; returns the per-epoch history.

    ``objective(model, inputs, target)`` replaces the default batch loss (task
    loss, or distillation from ``ctx.teacher`` on unlabeled batches);
    ``regularizer(model)`` is added to every batch loss (e.g. low-rank Hoyer and
    orthogonality terms). Early stopping restores the best weights.
    ``recovery`` or a ``node_input`` (the model as it entered a compression node)
    marks a recovery fine-tune, where ``auto`` options turn on; ``distill``
    distils from ``node_input``, or from ``ctx.teacher`` without one.

    With ``ctx.training_cache`` (the search's trials), a training whose inputs equal an earlier one's restores
    its result instead (:mod:`.training_cache`); ``reuse_key`` names what ``regularizer`` / ``objective``
    compute (JSON-able): without it, a training with either is always run.
    """
    if params.epochs == 0:
        return TrainReport()
    generators = loader_generators(ctx.train_loader, ctx.val_loader)  # part of the random state a training uses
    key = _reuse_key(model, ctx, params, regularizer, objective, node_input, recovery, reuse_key, generators)
    if key is not None:
        entry = ctx.training_cache.load(key)
        if entry is not None:
            return _restored(model, ctx, entry, tag, generators)
    report = _train(model, ctx, params, regularizer=regularizer, tag=tag, objective=objective,
                    node_input=node_input, recovery=recovery)
    if key is not None:
        ctx.training_cache.save(key, model.state_dict(), report, generators)
    return report


def _callable_name(fn: Any) -> Optional[str]:
    """A loss's name across processes: a module's printed form, a function's qualified name."""
    if fn is None or isinstance(fn, nn.Module):
        return repr(fn)
    name = getattr(fn, "__qualname__", None)
    return f"{getattr(fn, '__module__', '')}.{name}" if name and "<" not in name else None


def _loader_facts(loader: Any) -> Any:
    if loader is None:
        return None
    dataset = getattr(loader, "dataset", None)
    try:
        size = len(dataset)
    except TypeError:
        size = None
    return [type(dataset).__name__, size, getattr(loader, "batch_size", None)]


def _reuse_key(model: nn.Module, ctx: NodeContext, params: TrainParams, regularizer: Any, objective: Any,
               node_input: Optional[nn.Module], recovery: bool, reuse_key: Optional[Mapping],
               generators: list[torch.Generator]) -> Optional[str]:
    """The training cache's key of this call, or None when it is not reused (no cache, intermediate checkpoints
    wanted, a regularizer or objective without ``reuse_key``, a loss or model that cannot be named)."""
    cache = ctx.training_cache
    if cache is None or ctx.common.save_each > 0 or ((regularizer or objective) and reuse_key is None):
        return None
    loss = _callable_name(ctx.loss_fn)
    if loss is None:
        return None
    options = {"params": params.model_dump(mode="json"), "common": ctx.common.model_dump(mode="json"),
               "recovery": recovery, "loss": loss, "extra": dict(reuse_key or {}), "device": str(ctx.device),
               "data": [_loader_facts(ctx.train_loader), _loader_facts(ctx.val_loader)]}
    return cache.key(options, {"model": model, "teacher": ctx.teacher, "node_input": node_input}, generators)


def _restored(model: nn.Module, ctx: NodeContext, entry: Mapping[str, Any], tag: str,
              generators: list[torch.Generator]) -> TrainReport:
    """The earlier training's weights and the random state it left; the node's row notes it."""
    model.load_state_dict(entry["state"])
    set_random_state(entry["random"], generators)
    model.eval()
    report = entry["report"]
    ctx.note(f"{tag}: {report.epochs_run} epochs reused from an identical earlier training")
    last = {k: v for k, v in (report.history[-1] if report.history else {}).items() if k != "epoch"}
    ctx.log({**{_tagged(tag, k): v for k, v in last.items()}, _tagged(tag, REUSED): report.epochs_run},
            report.epochs_run)  # the metrics the weights ended with; hooks see no epoch run
    return report


def _tagged(tag: str, name: str) -> str:
    """A logged metric's name: ``<tag>_<name>`` (``name`` alone for the training node's ``train``)."""
    return f"{tag}_{name}" if tag != "train" else name


def _train(model: nn.Module, ctx: NodeContext, params: TrainParams, *, regularizer: Optional[Regularizer],
           tag: str, objective: Optional[Objective], node_input: Optional[nn.Module], recovery: bool) -> TrainReport:
    report = TrainReport()
    device = ctx.device
    model.to(device)
    teacher = ctx.teacher.to(device).eval()
    task_loss = instantiate_loss(params.custom_loss) if params.custom_loss else ctx.loss_fn
    recovery = recovery or node_input is not None
    if objective is None:
        distill_from = None
        if _resolve(params.distill, recovery):
            distill_from = (node_input if node_input is not None else teacher).to(device).eval()
        unlabeled = unlabeled_comparison(params)
        if own_step(model) is not None and not params.custom_loss:
            objective = module_objective(teacher, task_loss, distill_from, params.distill_weight, unlabeled)
        else:
            objective = default_objective(teacher, task_loss, distill_from, params.distill_weight, params.temperature,
                                          unlabeled)
    optimizer = make_optimizer(params, model)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)
                 if params.scheduler == "cosine" else None)
    limit_train = ctx.limit("train", params.limit_train_batches)
    limit_valid = ctx.limit("valid", params.limit_valid_batches)
    stop = params.early_stopping
    best_value, best_state, bad_epochs = None, None, 0
    keep_best = _resolve(params.keep_best, recovery) and ctx.val_loader is not None
    best_of_all = params.keep_best is True  # auto: only the start competes with the end
    kept_score, kept_state, kept_epoch = None, None, 0
    if keep_best:
        kept_score = _score(_validate(model, ctx, task_loss, device, limit_valid))
        kept_state = copy.deepcopy(model.state_dict()) if kept_score is not None else None
    label = ctx.node_label or tag

    epochs = epoch_bar(params.epochs, label, params.progress)
    for epoch in range(params.epochs):
        model.train()
        total, seen, start = 0.0, 0, time.perf_counter()
        bar = batch_bar(ctx.train_loader, limit_train, f"{label} epoch {epoch + 1}/{params.epochs}", params.progress)
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
        reset_metrics(model)  # training metrics a module's own training_step accumulated
        row = {"train_loss": total / seen, "epoch_s": time.perf_counter() - start}
        row.update(_validate(model, ctx, task_loss, device, limit_valid))
        report.history.append({"epoch": epoch + 1, **row})
        report.epochs_run = epoch + 1
        epochs.update(1)
        epochs.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("train_loss", "val_loss", "val_accuracy")})
        ctx.log({_tagged(tag, k): v for k, v in row.items()}, epoch + 1)
        if ctx.common.save_each > 0 and (epoch + 1) % ctx.common.save_each == 0:
            ctx.save_intermediate(model, f"epoch_{epoch + 1:04d}")
        if keep_best and best_of_all:
            score = _score(row)
            if score is not None and (kept_score is None or score > kept_score):
                kept_score, kept_state, kept_epoch = score, copy.deepcopy(model.state_dict()), epoch + 1
        if stop is not None:
            value = row.get(stop.monitor)
            if _improved(stop.monitor, value, best_value, stop.min_delta):
                best_value, best_state, bad_epochs = value, copy.deepcopy(model.state_dict()), 0
            else:
                bad_epochs += 1
                if bad_epochs >= stop.patience:
                    report.stopped_early = True
                    break
    epochs.close()
    if best_state is not None and not (keep_best and best_of_all):
        model.load_state_dict(best_state)
    if kept_state is not None:  # keep_best with a validation score
        if not best_of_all:
            end = _score(_validate(model, ctx, task_loss, device, limit_valid) if best_state is not None else row)
            if end is not None and end >= kept_score:
                kept_state, kept_epoch = None, report.epochs_run
        report.best_epoch = kept_epoch
        if kept_state is not None:
            model.load_state_dict(kept_state)
    model.eval()
    return report
