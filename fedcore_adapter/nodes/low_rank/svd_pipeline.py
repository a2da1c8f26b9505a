"""The ``svd`` method's pipeline: spectra (optionally after FedCore's regularised U,S,Vh training), ranks by
strategy, by the best of several thresholds, or by a budget, then the factorised layers and their record."""
from __future__ import annotations

import copy
from typing import Any, Optional

from torch import nn

from ...context import NodeContext
from ...errors import NodeError
from ...metrics import count_params, evaluate
from ...trainer import train
from ..toolkit import per_layer
from . import falor as falor_mod
from .allocation import BudgetError, LayerSpectrum, allocate, budget_total
from .calibration import input_statistics
from .config import LowRankConfig
from .decompose_config import describe, new_config
from .rank_strategies import choose_rank, kept_fraction
from .regularized import SVDParametrized, regularizer, trained_spectrum
from .sensitivity import Spectrum, SpectrumJob, component_weights, rank_sensitivity
from .svd import factorize, split, weight_matrix
from .svd_config import SVDMethod
from .targets import Ranks, Target, find_layers

METHOD = "svd"
CAN_FACTORISE = ""  # every Linear, Conv1d/2d (groups 1) and Embedding of layer_types


def candidates(model: nn.Module, config: LowRankConfig) -> list[tuple[str, nn.Module]]:
    """Every layer of ``config.layer_types`` (an already factorised one may be narrowed)."""
    return find_layers(model, config.layer_types, config.include, config.exclude, refactorize=True)


def mode(method: SVDMethod) -> str:
    """How convolutions are factorised (``decomposing_mode``)."""
    return method.decomposing_mode


def check(method: SVDMethod, targets: dict[str, Target], label: str) -> None:
    """A fixed ``rank`` every layer allows (before the model is touched)."""
    if method.budget is None and method.spectrum_pruning_strategy == "rank":
        too_small = [t for t in targets.values() if method.rank > t.max_rank]
        if too_small:
            names = ", ".join(f"{t.name} (at most {t.max_rank})" for t in too_small[:4])
            more = f" and {len(too_small) - 4} more" if len(too_small) > 4 else ""
            raise NodeError(label, f"rank = {method.rank} is larger than these layers allow: {names}{more}; "
                                   f"lower rank or add them to exclude")


# -- rank choice ----------------------------------------------------------------------------------------------
def _ranks_for(method: SVDMethod, threshold: float, targets: dict[str, Target], spectra: dict[str, Spectrum]) -> Ranks:
    ranks: Ranks = {}
    for name, t in targets.items():
        sp = spectra[name]
        r = choose_rank(method.spectrum_pruning_strategy, sp.s, t, threshold=threshold, rank=method.rank,
                        weights=sp.weights)
        ranks[name] = min(r, t.max_rank) if t.saves(min(r, t.max_rank)) else None
    return ranks


def _budget_ranks(method: SVDMethod, targets: dict[str, Target], spectra: dict[str, Spectrum], model: nn.Module,
                  inputs: Any, label: str) -> Ranks:
    total, target = budget_total(method.budget, model, inputs)
    try:
        return allocate([LayerSpectrum(targets[n], spectra[n].s) for n in targets], total, target,
                        method.budget.metric)
    except BudgetError as err:
        raise NodeError(label, f"budget cannot be met: {err}") from None


def _layer_meta(method: SVDMethod, t: Target, sp: Spectrum, rank: int, threshold: Optional[float]) -> dict:
    meta = {"kind": t.kind, "mode": t.mode, "full_rank": t.full_rank, "rank": rank,
            "strategy": "budget" if method.budget else method.spectrum_pruning_strategy,
            "energy_kept": kept_fraction(sp.s, rank), "params_before": t.params, "params_after": t.params_at(rank),
            "macs_before": t.macs, "macs_after": t.macs_at(rank)}
    if threshold is not None and method.budget is None:
        meta["threshold"] = threshold
    if sp.weights is not None:
        meta["explained_variance_kept"] = kept_fraction(sp.s, rank, sp.weights)
    if method.epochs:
        meta["trained_epochs"] = method.epochs
    return meta


def _materialize(base: nn.Module, ranks: Ranks, targets: dict[str, Target], spectra: dict[str, Spectrum],
                 method: SVDMethod, threshold: Optional[float]) -> tuple[nn.Module, dict]:
    """Replace every chosen layer of ``base`` (in place) by its factors; the decompose_config of the result."""
    record = new_config(METHOD)
    modules = dict(base.named_modules())
    for name, t in targets.items():
        module, rank, sp = modules[name], ranks[name], spectra[name]
        if isinstance(module, SVDParametrized):
            original = module.original
            if rank is None and t.current_rank is None:
                base.set_submodule(name, module.dense())
                continue
            rank = rank or t.current_rank
        else:
            original = module
            if rank is None:
                continue
        a, b = split(sp.u, sp.s, sp.vh, rank)
        bias = module.bias if isinstance(module, SVDParametrized) else "keep"
        new = factorize(original, t.mode, a, b, bias)
        base.set_submodule(name, new)
        if t.current_rank is not None and rank >= t.current_rank:
            continue  # same structure as before: nothing to record
        record["layers"][name] = describe(original, new, rank, _layer_meta(method, t, sp, rank, threshold))
    return base, record


# -- candidates (several thresholds) ---------------------------------------------------------------------
def _score(model: nn.Module, ctx: NodeContext, inputs: list, references: list) -> tuple[str, float]:
    """Validation accuracy (higher is better), else loss, else output NSR to the input model (lower)."""
    if ctx.val_loader is not None:
        result = evaluate(model, ctx.val_loader, ctx.loss_fn, ctx.device, ctx.limit("valid"))
        if result.get("accuracy") is not None:
            return "accuracy", result["accuracy"]
        if result.get("loss") is not None:
            return "loss", result["loss"]
    outs = falor_mod.model_rows(model, inputs)
    return "nsr", sum(falor_mod.noise_to_signal(o, r) for o, r in zip(outs, references)) / len(outs)


def _select(candidates: list[dict], tolerance: float) -> dict:
    """Smallest candidate whose score is within ``tolerance`` of the best one."""
    metric = candidates[0]["metric"]
    if metric == "accuracy":
        best = max(c["score"] for c in candidates)
        fits = [c for c in candidates if c["score"] >= best - tolerance]
    elif metric == "loss":
        best = min(c["score"] for c in candidates)
        fits = [c for c in candidates if c["score"] <= best * (1 + tolerance) + 1e-12]
    else:
        best = min(c["score"] for c in candidates)
        fits = [c for c in candidates if c["score"] <= best + tolerance]
    return min(fits, key=lambda c: (c["params"], -c["threshold"]))


def _spectra(model: nn.Module, config: LowRankConfig, ctx: NodeContext, targets: dict[str, Target],
             inputs: list) -> tuple[nn.Module, dict[str, Spectrum]]:
    """The model the factors are cut from (``model``, or its U,S,Vh-trained copy) and each layer's spectrum."""
    method: SVDMethod = config.method
    stats = {}
    if method.spectrum_pruning_strategy == "explained_variance" and method.budget is None:
        stats = input_statistics(model, inputs, {n: t.mode for n, t in targets.items()})
    side = {n: "rows" if t.kind == "embedding" else "cols" for n, t in targets.items()}
    if not method.epochs:
        modules = dict(model.named_modules())
        jobs = [SpectrumJob(n, weight_matrix(modules[n], t.mode), stats.get(n), side[n]) for n, t in targets.items()]
        return model, per_layer(ctx, rank_sensitivity, jobs)
    base = copy.deepcopy(model)
    for name, t in targets.items():
        base.set_submodule(name, SVDParametrized(base.get_submodule(name), t.mode))
    train(base, ctx, method.train_params(config.finetune_params),
          regularizer=regularizer(method.hoyer_loss, method.orthogonal_loss), tag="low_rank_train", node_input=model,
          reuse_key={"regularizer": "hoyer_orthogonal", "hoyer_loss": method.hoyer_loss,
                     "orthogonal_loss": method.orthogonal_loss})
    spectra = {}
    for name in targets:
        sp = trained_spectrum(name, base.get_submodule(name))
        sp.weights = component_weights(sp.u, sp.vh, stats.get(name), side[name])
        spectra[name] = sp
    return base, spectra


def run(model: nn.Module, config: LowRankConfig, ctx: NodeContext, targets: dict[str, Target], inputs: list,
        label: str) -> tuple[nn.Module, dict]:
    """The factorised model and its decompose_config."""
    method: SVDMethod = config.method
    base, spectra = _spectra(model, config, ctx, targets, inputs)
    if method.budget is not None:
        return _materialize(base, _budget_ranks(method, targets, spectra, model, inputs[0], label), targets, spectra,
                            method, None)
    if len(method.thresholds) == 1:
        threshold = method.thresholds[0]
        return _materialize(base, _ranks_for(method, threshold, targets, spectra), targets, spectra, method, threshold)
    references = falor_mod.model_rows(model, inputs[:1])
    tried = []
    for threshold in method.thresholds:
        candidate, record = _materialize(copy.deepcopy(base), _ranks_for(method, threshold, targets, spectra),
                                         targets, spectra, method, threshold)
        metric, score = _score(candidate, ctx, inputs[:1], references)
        tried.append({"threshold": threshold, "metric": metric, "score": score,
                      "params": count_params(candidate), "model": candidate, "record": record})
    chosen = _select(tried, method.selection_tolerance)
    chosen["record"]["meta"]["candidates"] = [{k: c[k] for k in ("threshold", "metric", "score", "params")}
                                              for c in tried]
    chosen["record"]["meta"]["chosen_threshold"] = chosen["threshold"]
    return chosen["model"], chosen["record"]
