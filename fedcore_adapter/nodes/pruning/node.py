"""``pruning`` node (FedCore ``pruning_model``): iterative structured pruning with fine-tuning between steps.

The node prunes the model it receives (never the setup's original), works on
a copy so a bad option leaves the input untouched, and records every removal
(``history.REPLAY_NAME``) so ``load_model`` can rebuild the pruned structure.
With ``reconstruct``, each layer that lost input channels or heads is re-fitted by least squares
to the outputs of the model before the step (:mod:`.reconstruction`). It writes ``pruning_report.json``
(weight shapes before/after, skipped layers) and, with ``sensitivity_ratios``, ``sensitivity.json``
beside its checkpoint.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from ...context import NodeContext
from ...data import limited
from ...registry import register_node
from ...trainer import train
from ..toolkit import calibration_limit, input_batches, write_report
from .backend import accumulate_gradients, example_inputs, make_pruner
from .config import PruningConfig
from .history import REPLAY_NAME, History
from .reconstruction import Reconstruction
from .sensitivity import pruning_sensitivity

DEFAULT_CALIBRATION_BATCHES = 16


def bn_l1(strength: float) -> Callable[[nn.Module], torch.Tensor]:
    """L1 penalty on BatchNorm scales (network slimming), pushing whole channels towards zero."""

    def regularizer(model: nn.Module) -> torch.Tensor:
        scales = [m.weight.abs().sum() for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
        return strength * torch.stack(scales).sum() if scales else torch.zeros(())

    return regularizer


def _shapes(model: nn.Module, names: set[str]) -> dict[str, dict[str, list[int]]]:
    out = {}
    for name in sorted(names):
        try:
            module = model.get_submodule(name)
            out[name] = {k: list(p.shape) for k, p in module.named_parameters(recurse=False)}
        except AttributeError:  # an unwrapped parameter
            out[name] = {"": list(model.get_parameter(name).shape)}
    return out


@register_node(PruningConfig)
def apply_pruning(model: nn.Module, config: PruningConfig, ctx: NodeContext) -> nn.Module:
    label = ctx.node_label or config.label
    inputs = example_inputs(ctx.train_loader, ctx.device)
    work = copy.deepcopy(model)
    reconstruction = None
    if config.reconstruct:
        limit = calibration_limit(ctx, config.calibration_batches, DEFAULT_CALIBRATION_BATCHES)
        reconstruction = Reconstruction(model, input_batches(ctx.train_loader, limit, ctx.device))
    pruner = make_pruner(work, inputs, label=label, ratio=config.pruning_ratio, steps=config.pruning_iterations,
                         head_ratio=config.head_pruning_ratio, importance=config.importance,
                         importance_norm=config.importance_norm, global_pruning=config.global_pruning,
                         round_to=config.round_to, ignored_layers=config.ignored_layers,
                         schedule=config.schedule, reconstruction=reconstruction)
    if config.sensitivity_ratios:
        rows = pruning_sensitivity(model, ctx.val_loader or ctx.train_loader, config.sensitivity_ratios,
                                   importance=config.importance, importance_norm=config.importance_norm,
                                   loss_fn=ctx.loss_fn, limit_batches=ctx.limit("valid"), executor=ctx,
                                   device=ctx.device, round_to=config.round_to, ignored_layers=config.ignored_layers)
        write_report(ctx, "sensitivity.json", rows)
    before = {n: list(p.shape) for n, p in work.named_parameters()}
    history = History()
    regularizer = bn_l1(config.bn_sparsity) if config.bn_sparsity else None
    for step in range(1, config.pruning_iterations + 1):
        if config.importance == "taylor":
            batches = limited(ctx.train_loader, calibration_limit(ctx, config.calibration_batches,
                                                                  DEFAULT_CALIBRATION_BATCHES))
            accumulate_gradients(work, batches, ctx.loss_fn, ctx.device)
        with torch.no_grad():
            pruner.step(history, step)
        work.zero_grad(set_to_none=True)
        params = config.step_params(last=step == config.pruning_iterations)
        if params.epochs:
            train(work, ctx, params, regularizer=regularizer, tag=f"finetune_{step}", node_input=model,
                  reuse_key={"bn_sparsity": config.bn_sparsity})
    if history:
        ctx.record_structure(REPLAY_NAME, history.to_json())
    changed = {n.rpartition(".")[0] for n, p in work.named_parameters() if list(p.shape) != before.get(n)}
    write_report(ctx, "pruning_report.json", {
        "backend": type(pruner).__name__, "layer_groups": pruner.group_names(),
        "skipped": getattr(pruner, "skipped", []),
        "params_before": sum(torch.Size(s).numel() for s in before.values()),
        "params_after": sum(p.numel() for p in work.parameters()),
        "changed_layers": _shapes(work, changed)})
    return work.eval()
