"""``low_rank`` node (FedCore ``low_rank_model``): validate, choose ranks, factorise, record, fine-tune."""
from __future__ import annotations

import copy
import functools
import logging
import math
from typing import Any, Optional

from torch import nn

from ...checkpoint import write_json
from ...context import NodeContext
from ...errors import NodeError
from ...metrics import count_macs, count_params, evaluate
from ...registry import register_node
from ...trainer import train
from ..toolkit import per_layer
from . import falor as falor_mod
from .budget import KEEP, BudgetError, allocate, cost, minimum_total
from .calibration import calibration_inputs, collect_output_covariances, input_statistics
from .config import LowRankConfig
from .decompose_config import FILE_NAME, describe, new_config
from .output_weights import gradient_grams, sqrt_pair
from .rank_strategies import choose_rank, kept_fraction
from .regularized import SVDParametrized, regularizer, trained_spectrum
from .sensitivity import Spectrum, SpectrumJob, component_weights, rank_sensitivity
from .sequential import sequential_fit
from .svd import factorize, split, weight_matrix
from .targets import Target, find_layers, make_target, probe_positions

log = logging.getLogger("fedcore_adapter.low_rank")
Ranks = dict[str, Optional[int]]  # layer -> rank, or None: leave the layer as it is


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _falor_eligible(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and set(module.kernel_size) == {1})


# -- validation (before the model is touched) --------------------------------------------------------------
def _budget_total(config: LowRankConfig, model: nn.Module, inputs: Any) -> tuple[int, float]:
    metric = config.budget.metric
    total = count_params(model) if metric == "params" else count_macs(model, inputs)
    target = config.budget.value if config.budget.value is not None else config.budget.ratio * total
    return total, target


def _validate(config: LowRankConfig, targets: dict[str, Target], model: nn.Module, inputs: Any, label: str) -> None:
    if config.method == "svd" and config.budget is None and config.spectrum_pruning_strategy == "rank":
        too_small = [t for t in targets.values() if config.rank > t.max_rank]
        if too_small:
            names = ", ".join(f"{t.name} (at most {t.max_rank})" for t in too_small[:4])
            more = f" and {len(too_small) - 4} more" if len(too_small) > 4 else ""
            raise NodeError(label, f"rank = {config.rank} is larger than these layers allow: {names}{more}; "
                                   f"lower rank or add them to exclude")
    if config.budget is not None:
        total, target = _budget_total(config, model, inputs)
        floor = minimum_total(list(targets.values()), total, config.budget.metric)
        if floor > target:
            given = f"ratio = {config.budget.ratio}" if config.budget.ratio is not None else f"value = {config.budget.value}"
            raise NodeError(label, f"budget.{given} ({config.budget.metric}) cannot be met: the smallest model "
                                   f"reachable has {floor} {config.budget.metric} ({floor / total:.3f} of {total}); "
                                   f"allowed: a target of at least {floor / total:.3f}")


# -- rank choice ----------------------------------------------------------------------------------------------
def _ranks_for(config: LowRankConfig, threshold: float, targets: dict[str, Target],
               spectra: dict[str, Spectrum]) -> Ranks:
    ranks: Ranks = {}
    for name, t in targets.items():
        sp = spectra[name]
        r = choose_rank(config.spectrum_pruning_strategy, sp.s, t, threshold=threshold, rank=config.rank,
                        weights=sp.weights)
        ranks[name] = min(r, t.max_rank) if t.saves(min(r, t.max_rank)) else None
    return ranks


def _budget_ranks(config: LowRankConfig, targets: dict[str, Target], spectra: dict[str, Spectrum],
                  model: nn.Module, inputs: Any, label: str) -> Ranks:
    from .budget import LayerSpectrum

    total, target = _budget_total(config, model, inputs)
    try:
        return allocate([LayerSpectrum(targets[n], spectra[n].s) for n in targets], total, target,
                        config.budget.metric)
    except BudgetError as err:
        raise NodeError(label, f"budget cannot be met: {err}") from None


def _layer_meta(config: LowRankConfig, t: Target, sp: Spectrum, rank: int, threshold: Optional[float]) -> dict:
    meta = {"kind": t.kind, "mode": t.mode, "full_rank": t.full_rank, "rank": rank,
            "strategy": "budget" if config.budget else config.spectrum_pruning_strategy,
            "energy_kept": kept_fraction(sp.s, rank), "params_before": t.params, "params_after": t.params_at(rank),
            "macs_before": t.macs, "macs_after": t.macs_at(rank)}
    if threshold is not None and config.budget is None:
        meta["threshold"] = threshold
    if sp.weights is not None:
        meta["explained_variance_kept"] = kept_fraction(sp.s, rank, sp.weights)
    if config.epochs:
        meta["trained_epochs"] = config.epochs
    return meta


def _materialize(base: nn.Module, ranks: Ranks, targets: dict[str, Target], spectra: dict[str, Spectrum],
                 config: LowRankConfig, threshold: Optional[float], method: str) -> tuple[nn.Module, dict]:
    """Replace every chosen layer of ``base`` (in place) by its factors; the decompose_config of the result."""
    record = new_config(method)
    modules = dict(base.named_modules())
    for name, t in targets.items():
        module, rank, sp = modules[name], ranks[name], spectra[name]
        if isinstance(module, SVDParametrized):
            original = module.original
            if rank is None and t.current_rank is None:
                _replace(base, name, module.dense())
                continue
            rank = rank or t.current_rank
        else:
            original = module
            if rank is None:
                continue
        a, b = split(sp.u, sp.s, sp.vh, rank)
        bias = module.bias if isinstance(module, SVDParametrized) else "keep"
        new = factorize(original, t.mode, a, b, bias)
        _replace(base, name, new)
        if t.current_rank is not None and rank >= t.current_rank:
            continue  # same structure as before: nothing to record
        record["layers"][name] = describe(original, new, rank, _layer_meta(config, t, sp, rank, threshold))
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


# -- the two methods ---------------------------------------------------------------------------------------
def _svd(model: nn.Module, config: LowRankConfig, ctx: NodeContext, targets: dict[str, Target],
         inputs: list, label: str) -> tuple[nn.Module, dict]:
    stats = {}
    if config.spectrum_pruning_strategy == "explained_variance" and config.budget is None:
        stats = input_statistics(model, inputs, {n: t.mode for n, t in targets.items()})
    modules = dict(model.named_modules())
    if config.epochs:
        base = copy.deepcopy(model)
        for name, t in targets.items():
            _replace(base, name, SVDParametrized(base.get_submodule(name), t.mode))
        train(base, ctx, _regularized_params(config), regularizer=regularizer(config.hoyer_loss, config.orthogonal_loss),
              tag="low_rank_train", node_input=model)
        spectra = {}
        for name, t in targets.items():
            sp = trained_spectrum(name, base.get_submodule(name))
            sp.weights = component_weights(sp.u, sp.vh, stats.get(name), "rows" if t.kind == "embedding" else "cols")
            spectra[name] = sp
    else:
        base = model
        jobs = [SpectrumJob(n, weight_matrix(modules[n], t.mode), stats.get(n),
                            "rows" if t.kind == "embedding" else "cols") for n, t in targets.items()]
        spectra = per_layer(ctx, rank_sensitivity, jobs)
    if config.budget is not None:
        ranks = _budget_ranks(config, targets, spectra, model, inputs[0], label)
        return _materialize(base, ranks, targets, spectra, config, None, "svd")
    if len(config.thresholds) == 1:
        threshold = config.thresholds[0]
        return _materialize(base, _ranks_for(config, threshold, targets, spectra), targets, spectra, config,
                            threshold, "svd")
    references = falor_mod.model_rows(model, inputs[:1])
    candidates = []
    for threshold in config.thresholds:
        candidate, record = _materialize(copy.deepcopy(base), _ranks_for(config, threshold, targets, spectra),
                                         targets, spectra, config, threshold, "svd")
        metric, score = _score(candidate, ctx, inputs[:1], references)
        candidates.append({"threshold": threshold, "metric": metric, "score": score,
                           "params": count_params(candidate), "model": candidate, "record": record})
    chosen = _select(candidates, config.selection_tolerance)
    chosen["record"]["meta"]["candidates"] = [{k: c[k] for k in ("threshold", "metric", "score", "params")}
                                              for c in candidates]
    chosen["record"]["meta"]["chosen_threshold"] = chosen["threshold"]
    return chosen["model"], chosen["record"]


def _falor_budget_ranks(config: LowRankConfig, targets: dict[str, Target], results: dict, model: nn.Module,
                        inputs: Any, label: str, key: str) -> Ranks:
    """Ranks meeting ``budget`` with the least summed loss; an interpolated rank's estimate joins its trials."""
    total, target = _budget_total(config, model, inputs)
    metric = config.budget.metric
    cost_at = {n: functools.partial(cost, targets[n], metric) for n in results}
    cost_now = {n: cost(targets[n], metric, KEEP) for n in results}
    try:
        ranks, estimates = falor_mod.allocate_to_saving(list(results.values()), cost_at, cost_now, total - target, key)
    except BudgetError as err:
        raise NodeError(label, f"budget cannot be met: {err}; allowed: a larger budget, or more grid_points") from None
    for name, trial in estimates.items():
        results[name].trials.append(trial)
    return ranks


def _falor(model: nn.Module, config: LowRankConfig, ctx: NodeContext, targets: dict[str, Target],
           inputs: list, label: str) -> tuple[nn.Module, dict]:
    covariances = collect_output_covariances(model, inputs, list(targets),
                                             centered=config.falor_statistic == "covariance")
    work = copy.deepcopy(model)  # the original: searched on (weights restored) and the sequential fit's target
    metric_inputs = inputs[:config.metric_batches]
    metric, key = config.falor_metric, falor_mod.TRIAL_KEY[config.falor_metric]
    threshold = config.nsr_threshold if metric == "nsr" else config.cosine_loss_threshold
    if config.budget is not None:
        threshold = math.inf  # the grid measures every rank; the budget, not a loss bound, picks among them
    references = falor_mod.model_outputs(work, metric_inputs, metric)
    output_weights = {}
    if config.falor_weighting == "gradient":  # measured on the original, before any layer changes
        grams = gradient_grams(work, inputs, [n for n in targets if n in covariances], metric, config.falor_probes)
        output_weights = {name: sqrt_pair(gram) for name, gram in grams.items()}
    jobs = [falor_mod.FalorJob(n, covariances[n], t.largest_saving_rank(), output_weights.get(n))
            for n, t in targets.items() if n in covariances]
    search = functools.partial(falor_mod.falor_search, model=work, inputs=metric_inputs, references=references,
                               nsr_threshold=threshold, kl_threshold=config.kl_threshold, metric=metric,
                               grid=config.grid_points if config.allocation == "global" else None)
    results = per_layer(ctx, search, jobs)
    if config.budget is not None:
        ranks = _falor_budget_ranks(config, targets, results, model, inputs[0], label, key)
    elif config.allocation == "global":
        ranks = falor_mod.allocate_nsr(list(results.values()), {n: targets[n].params_at for n in results},
                                       {n: targets[n].params for n in results}, threshold,
                                       config.kl_threshold, key)
    else:
        ranks = {n: r.rank for n, r in results.items()}
    ranks = {n: r for n, r in ranks.items() if r is not None}
    record = new_config("falor", {"nsr_threshold": config.nsr_threshold, "kl_threshold": config.kl_threshold,
                                  "metric": metric, "cosine_loss_threshold": config.cosine_loss_threshold,
                                  "statistic": config.falor_statistic, "fit": config.falor_fit,
                                  "allocation": config.allocation, "calibration_batches": len(inputs),
                                  "metric_batches": len(metric_inputs),
                                  "budget": config.budget.model_dump() if config.budget else None})
    kept = sorted(n for n in results if n not in ranks) if config.falor_refit_kept else []  # refitted at full rank
    if config.falor_fit == "sequential":
        record["meta"]["damping"] = config.falor_damping
        record["meta"]["weighting"] = config.falor_weighting
        if config.falor_weighting == "gradient":
            record["meta"]["probes"] = config.falor_probes
        record["meta"]["refit_kept"] = kept
    modules = dict(model.named_modules())

    def replace(name: str, a, b, bias="keep") -> None:
        layer, t, rank = modules[name], targets[name], ranks[name]
        new = factorize(layer, "channel", a, b, bias if bias is None or isinstance(bias, str) else bias.float())
        trial = next(tr for tr in results[name].trials if tr["rank"] == rank)
        meta = {"kind": t.kind, "mode": "channel", "full_rank": t.full_rank, "rank": rank,
                key: trial[key], "params_before": t.params, "params_after": t.params_at(rank),
                "macs_before": t.macs, "macs_after": t.macs_at(rank), "evaluations": results[name].evaluations}
        if "kl" in trial:
            meta["kl"] = trial["kl"]
        if trial.get("interpolated"):
            meta["interpolated"] = True  # a budget's rank between two measured ones: its loss is an estimate
        record["layers"][name] = describe(layer, new, rank, meta)
        _replace(model, name, new)

    if config.falor_fit == "sequential":
        sequential_fit(work, model, ranks, inputs, config.falor_damping, replace, output_weights, refit=kept)
    else:
        for name, rank in ranks.items():
            replace(name, *falor_mod.falor_factors(modules[name], results[name].eigvecs[:, :rank]))
    outputs = falor_mod.model_rows(model, metric_inputs)
    record["meta"]["model_nsr"] = falor_mod.distance(outputs, falor_mod.model_rows(work, metric_inputs))
    if metric == "cosine":
        record["meta"]["model_cosine_loss"] = falor_mod.distance(
            falor_mod.model_outputs(model, metric_inputs, metric), references, metric)
    return model, record


def _regularized_params(config: LowRankConfig):
    """The U,S,Vh training distils as the fine-tune does; it never falls back to its start (keep_best off)."""
    ft = config.finetune_params
    return config.train_params().model_copy(update={"distill": ft.distill, "distill_weight": ft.distill_weight,
                                                    "temperature": ft.temperature, "keep_best": False})


def _needs_input(params) -> bool:
    """The fine-tune distils from the input model (a copy: factorising works in place)."""
    return params.epochs > 0 and params.distill is not False


@register_node(LowRankConfig)
def apply_low_rank(model: nn.Module, config: LowRankConfig, ctx: NodeContext) -> nn.Module:
    """Factorise the chosen layers, write ``decompose_config.json``, record the structure, fine-tune."""
    label = ctx.node_label or config.label
    node_input = copy.deepcopy(model).eval() if _needs_input(config.finetune_params) else None
    layers = find_layers(model, config.layer_types, config.include, config.exclude,
                         refactorize=config.method == "svd")
    if config.method == "falor":
        layers = [(n, m) for n, m in layers if _falor_eligible(m)]
    inputs = calibration_inputs(ctx, config.calibration_batches)
    extents = probe_positions(model, inputs[0], [n for n, _ in layers])
    targets = {n: make_target(n, m, config.decomposing_mode, extents.get(n, {})) for n, m in layers}
    _validate(config, targets, model, inputs[0], label)
    if config.method == "falor":
        model, record = _falor(model, config, ctx, targets, inputs, label)
    else:
        model, record = _svd(model, config, ctx, targets, inputs, label)
    record["meta"].update({"node": label, "layers_considered": len(targets), "layers_replaced": len(record["layers"])})
    if not record["layers"]:
        log.warning("node %s: no layer was factorised (no rank both met the thresholds and saved parameters)", label)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(ctx.output_dir / FILE_NAME, record)
    if record["layers"]:
        ctx.record_structure("low_rank", record)
    if config.finetune_params.epochs:
        train(model, ctx, config.finetune_params, tag="finetune", node_input=node_input, recovery=True)
    return model
