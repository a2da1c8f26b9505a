"""``unstructured_pruning`` node: individual weights of Linear/Conv layers set to zero.

Sparsity rises over ``pruning_iterations`` along a schedule (linear, cubic =
AGP of Zhu & Gupta 2017, cosine), ranked by magnitude, Taylor (|w·grad| over
calibration batches) or at random, globally or per layer, with fine-tuning
between steps. While fine-tuning, gradient hooks keep pruned weights at zero;
at the end the hooks are removed and the zeros stay (masks made permanent).
Dense kernels still multiply the zeros, so latency and dense size do not
fall — the metrics say so. ``sparse_format=true`` stores the checkpoint as CSR
tensors where that saves bytes, and ``size_mb`` counts those bytes.
"""
from __future__ import annotations

import copy
import functools
import json
import math

import torch
from torch import nn

from ...context import NodeContext
from ...data import limited
from ...errors import NodeError
from ...registry import register_node
from ...trainer import train
from .backend import accumulate_gradients
from .config import UnstructuredPruningConfig
from ..toolkit import calibration_limit
from .node import DEFAULT_CALIBRATION_BATCHES
from .structured import _matches

PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def target_weights(model: nn.Module, ignored: list[str] = ()) -> dict[str, nn.Parameter]:
    """Weights of the Linear/Conv layers not named in ``ignored``, by parameter name."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, PRUNABLE) and not any(_matches(name, k) for k in ignored)}


def scheduled_sparsity(schedule: str, sparsity: float, step: int, steps: int) -> float:
    """Target sparsity after ``step`` of ``steps`` (reaches ``sparsity`` at the last step)."""
    f = step / steps
    if schedule == "linear":
        return sparsity * f
    if schedule == "cubic":
        return sparsity * (1 - (1 - f) ** 3)
    return sparsity * (1 - math.cos(math.pi * f)) / 2


def weight_scores(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], importance: str) -> dict:
    """Per-weight importance; weights already pruned score lowest so they stay pruned."""
    scores = {}
    for name, w in weights.items():
        if importance == "taylor":
            s = (w * w.grad).abs() if w.grad is not None else torch.zeros_like(w)
        elif importance == "random":
            s = torch.rand_like(w)
        else:
            s = w.abs()
        scores[name] = torch.where(masks[name], s.detach().float(), torch.full_like(s, -1.0, dtype=torch.float))
    return scores


def _mask_lowest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    k = int(fraction * scores.numel())
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return mask.view_as(scores)


def compute_masks(scores: dict[str, torch.Tensor], sparsity: float, global_pruning: bool) -> dict[str, torch.Tensor]:
    """Keep-masks zeroing the lowest-scoring ``sparsity`` of weights, across layers or in each layer."""
    if not global_pruning:
        return {name: _mask_lowest(s, sparsity) for name, s in scores.items()}
    flat = _mask_lowest(torch.cat([s.flatten() for s in scores.values()]), sparsity)
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = flat[start:start + s.numel()].view_as(s)
        start += s.numel()
    return out


def _masked_grad(masks: dict[str, torch.Tensor], name: str, grad: torch.Tensor) -> torch.Tensor:
    return grad * masks[name]


def layer_sparsity(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float((w == 0).sum()) / w.numel() for name, w in weights.items()}


@register_node(UnstructuredPruningConfig)
def apply_unstructured_pruning(model: nn.Module, config: UnstructuredPruningConfig, ctx: NodeContext) -> nn.Module:
    label = ctx.node_label or config.label
    known = {name for name, _ in model.named_modules()}
    for name in config.ignored_layers:
        if name not in known:
            raise NodeError(label, f"ignored_layers names layer {name!r}, which the model does not have")
    work = copy.deepcopy(model)
    weights = target_weights(work, config.ignored_layers)
    if not weights:
        raise NodeError(label, "the model has no Linear or Conv weight left to sparsify")
    masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    hooks = [w.register_hook(functools.partial(_masked_grad, masks, name)) for name, w in weights.items()]
    try:
        for step in range(1, config.pruning_iterations + 1):
            if config.importance == "taylor":
                batches = limited(ctx.train_loader,
                                  calibration_limit(ctx, config.calibration_batches, DEFAULT_CALIBRATION_BATCHES))
                accumulate_gradients(work, batches, ctx.loss_fn, ctx.device)
            target = scheduled_sparsity(config.schedule, config.sparsity, step, config.pruning_iterations)
            masks.update(compute_masks(weight_scores(weights, masks, config.importance), target, config.global_pruning))
            with torch.no_grad():
                for name, w in weights.items():
                    w.mul_(masks[name])
            work.zero_grad(set_to_none=True)
            params = config.step_params(last=step == config.pruning_iterations)
            if params.epochs:
                train(work, ctx, params, tag=f"finetune_{step}", node_input=model)
    finally:
        for h in hooks:
            h.remove()
    per_layer = layer_sparsity(weights)
    total = sum(w.numel() for w in weights.values())
    overall = sum(per_layer[n] * w.numel() for n, w in weights.items()) / total
    ctx.log({"sparsity": overall, **{f"sparsity.{n}": s for n, s in per_layer.items()}})
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    (ctx.output_dir / "sparsity.json").write_text(json.dumps({"overall": overall, "layers": per_layer}, indent=2))
    if config.sparse_format:
        ctx.checkpoint_options["sparse"] = True
    return work.eval()
