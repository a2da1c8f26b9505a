"""The ``falor`` method's pipeline: output statistics, the per-layer rank search (on the cluster when
distributed), ranks per layer / globally / for a budget, then the projected or sequentially fitted factors."""
from __future__ import annotations

import copy
import functools
import math
from typing import Any

from torch import nn

from ...context import NodeContext
from ...errors import NodeError
from ..toolkit import per_layer
from . import falor as falor_mod
from .allocation import KEEP, BudgetError, allocate_nsr, allocate_to_saving, budget_total, cost
from .calibration import collect_output_covariances
from .config import LowRankConfig
from .decompose_config import describe, new_config
from .falor_config import Cosine, FalorMethod, Sequential
from .output_weights import gradient_grams, sqrt_pair
from .sequential import sequential_fit
from .svd import factorize
from .targets import Ranks, Target, find_layers

METHOD = "falor"
CAN_FACTORISE = " (Linear or 1x1 conv)"


def _eligible(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and set(module.kernel_size) == {1})


def candidates(model: nn.Module, config: LowRankConfig) -> list[tuple[str, nn.Module]]:
    """The Linear and 1x1 conv layers of ``config.layer_types`` (never an already factorised one)."""
    layers = find_layers(model, config.layer_types, config.include, config.exclude, refactorize=False)
    return [(n, m) for n, m in layers if _eligible(m)]


def mode(method: FalorMethod) -> str:
    """Always ``channel``: falor factorises Linear and 1x1 conv layers."""
    return "channel"


def check(method: FalorMethod, targets: dict[str, Target], label: str) -> None:
    """Nothing beyond the shared budget check."""


def _budget_ranks(method: FalorMethod, targets: dict[str, Target], results: dict, model: nn.Module, inputs: Any,
                  label: str, key: str) -> Ranks:
    """Ranks meeting ``budget`` with the least summed loss; an interpolated rank's estimate joins its trials."""
    total, target = budget_total(method.budget, model, inputs)
    metric = method.budget.metric
    cost_at = {n: functools.partial(cost, targets[n], metric) for n in results}
    cost_now = {n: cost(targets[n], metric, KEEP) for n in results}
    try:
        ranks, estimates = allocate_to_saving(list(results.values()), cost_at, cost_now, total - target, key)
    except BudgetError as err:
        raise NodeError(label, f"budget cannot be met: {err}; allowed: a larger budget, or more grid_points") from None
    for name, trial in estimates.items():
        results[name].trials.append(trial)
    return ranks


def _record(method: FalorMethod, inputs: list, metric_inputs: list, kept: list[str]) -> dict:
    metric, fit = method.metric, method.fit
    record = new_config(METHOD, {
        "nsr_threshold": None if isinstance(metric, Cosine) else metric.bound,
        "kl_threshold": getattr(metric, "kl_threshold", None), "metric": metric.name,
        "cosine_loss_threshold": metric.threshold if isinstance(metric, Cosine) else None,
        "statistic": method.statistic, "fit": fit.name, "allocation": method.allocation,
        "calibration_batches": len(inputs), "metric_batches": len(metric_inputs),
        "budget": method.budget.model_dump() if method.budget else None})
    if isinstance(fit, Sequential):
        record["meta"].update({"damping": fit.damping, "weighting": fit.weighting})
        if fit.weighting == "gradient":
            record["meta"]["probes"] = fit.probes
        record["meta"]["refit_kept"] = kept
    return record


def run(model: nn.Module, config: LowRankConfig, ctx: NodeContext, targets: dict[str, Target], inputs: list,
        label: str) -> tuple[nn.Module, dict]:
    """The factorised model (``model`` changed in place) and its decompose_config."""
    method: FalorMethod = config.method
    metric, fit = method.metric.name, method.fit
    sequential = isinstance(fit, Sequential)
    covariances = collect_output_covariances(model, inputs, list(targets), centered=method.statistic == "covariance")
    work = copy.deepcopy(model)  # the original: searched on (weights restored) and the sequential fit's target
    metric_inputs = inputs[:method.metric_batches]
    key = falor_mod.TRIAL_KEY[metric]
    # with a budget the grid measures every rank; the budget, not a loss bound, picks among them
    threshold = math.inf if method.budget is not None else method.metric.bound
    kl_threshold = getattr(method.metric, "kl_threshold", None)
    references = falor_mod.model_outputs(work, metric_inputs, metric)
    output_weights = {}
    if sequential and fit.weighting == "gradient":  # measured on the original, before any layer changes
        grams = gradient_grams(work, inputs, [n for n in targets if n in covariances], metric, fit.probes)
        output_weights = {name: sqrt_pair(gram) for name, gram in grams.items()}
    jobs = [falor_mod.FalorJob(n, covariances[n], t.largest_saving_rank(), output_weights.get(n))
            for n, t in targets.items() if n in covariances]
    search = functools.partial(falor_mod.falor_search, model=work, inputs=metric_inputs, references=references,
                               nsr_threshold=threshold, kl_threshold=kl_threshold, metric=metric,
                               grid=method.grid_points if method.allocation == "global" else None)
    results = per_layer(ctx, search, jobs)
    if method.budget is not None:
        ranks = _budget_ranks(method, targets, results, model, inputs[0], label, key)
    elif method.allocation == "global":
        ranks = allocate_nsr(list(results.values()), {n: targets[n].params_at for n in results},
                             {n: targets[n].params for n in results}, threshold, kl_threshold, key)
    else:
        ranks = {n: r.rank for n, r in results.items()}
    ranks = {n: r for n, r in ranks.items() if r is not None}
    # refitted at full rank
    kept = sorted(n for n in results if n not in ranks) if sequential and fit.refit_kept else []
    record = _record(method, inputs, metric_inputs, kept)
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
        model.set_submodule(name, new)

    if sequential:
        sequential_fit(work, model, ranks, inputs, fit.damping, replace, output_weights, refit=kept)
    else:
        for name, rank in ranks.items():
            replace(name, *falor_mod.falor_factors(modules[name], results[name].eigvecs[:, :rank]))
    outputs = falor_mod.model_rows(model, metric_inputs)
    record["meta"]["model_nsr"] = falor_mod.distance(outputs, falor_mod.model_rows(work, metric_inputs))
    if metric == "cosine":
        record["meta"]["model_cosine_loss"] = falor_mod.distance(
            falor_mod.model_outputs(model, metric_inputs, metric), references, metric)
    return model, record
