"""Per-layer pruning sensitivity: the metric drop when one layer group alone is pruned at a ratio.

Every (layer group, ratio) measurement is independent — it prunes its own copy
of the model — so an executor (``ctx.executor``, a Dask cluster when
``distributed_compression`` is on) can run each as a separate task. The task
function is a module-level ``functools.partial`` and the evaluation batches are
materialised tensors, so both pickle.
"""
from __future__ import annotations

import copy
import functools
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ...data import batch_size, call_model, limited, primary_output, split_batch, to_device
from ...errors import NodeError
from ..toolkit import per_layer
from .backend import accumulate_gradients, make_pruner, slice_inputs
from .history import History
from .structured import PruningWarning

METRICS = ("auto", "accuracy", "loss", "output_mse")
DEFAULT_BATCHES = 4


def _outputs(model: nn.Module, batches: list, device: torch.device) -> list[torch.Tensor]:
    model.eval()
    with torch.inference_mode():
        return [primary_output(call_model(model, split_batch(to_device(b, device))[0])).float().cpu() for b in batches]


def _score(metric: str, outputs: list[torch.Tensor], reference: list[torch.Tensor], batches: list,
           loss_fn: Optional[Callable]) -> float:
    if metric == "output_mse":  # relative to the unpruned model's output energy
        err = sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, reference))
        return err / max(sum(float(r.pow(2).sum()) for r in reference), 1e-12)
    targets = [split_batch(b)[1] for b in batches]
    n = sum(len(t) for t in targets)
    if metric == "accuracy":
        return sum(int((o.argmax(1) == t).sum()) for o, t in zip(outputs, targets)) / n
    return sum(float(loss_fn(o, t)) * len(t) for o, t in zip(outputs, targets)) / n


def _resolve_metric(metric: str, batches: list, reference: list[torch.Tensor], loss_fn: Optional[Callable]) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown sensitivity metric {metric!r}; valid: {', '.join(METRICS)}")
    target = split_batch(batches[0])[1]
    labeled_classes = target is not None and not target.is_floating_point() and reference[0].dim() == 2
    if metric == "auto":
        return "accuracy" if labeled_classes else ("loss" if target is not None and loss_fn else "output_mse")
    if metric == "accuracy" and not labeled_classes:
        raise ValueError("metric 'accuracy' needs labeled classification batches; use 'output_mse'")
    if metric == "loss" and (target is None or loss_fn is None):
        raise ValueError("metric 'loss' needs labeled batches and loss_fn; use 'output_mse'")
    return metric


def measure_group(item: tuple[str, float], *, model: nn.Module, batches: list, reference: list[torch.Tensor],
                  baseline: float, metric: str, loss_fn: Optional[Callable], device: str, options: dict) -> dict:
    """Prune layer group ``item[0]`` alone at ratio ``item[1]`` on a copy of ``model`` and score it."""
    group, ratio = item
    row: dict[str, Any] = {"layer": group, "ratio": ratio, "metric": metric, "baseline": baseline}
    work = copy.deepcopy(model).to(device)
    params = sum(p.numel() for p in work.parameters())
    example = slice_inputs(split_batch(to_device(batches[0], device))[0], 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PruningWarning)  # already reported when the groups were listed
            pruner = make_pruner(work, example, label="sensitivity", ratio={group: ratio}, **options)
        if options.get("importance") == "taylor":
            accumulate_gradients(work, batches, loss_fn, torch.device(device))
        with torch.no_grad():
            pruner.step(History(), 1)
    except NodeError as err:
        return {**row, "value": None, "drop": None, "params_removed": 0, "error": err.reason}
    value = _score(metric, _outputs(work, batches, torch.device(device)), reference, batches, loss_fn)
    drop = value - baseline if metric in ("loss", "output_mse") else baseline - value
    return {**row, "value": value, "drop": drop, "params_removed": params - sum(p.numel() for p in work.parameters())}


def pruning_sensitivity(model: nn.Module, loader: Any, ratios: Iterable[float], *, importance: str = "magnitude",
                        importance_norm: float = 2.0, metric: str = "auto", loss_fn: Optional[Callable] = None,
                        limit_batches: Optional[int] = None, layers: Optional[Iterable[str]] = None,
                        executor: Any = None, device: str | torch.device = "cpu", round_to: Optional[int] = None,
                        ignored_layers: Iterable[str] = ()) -> list[dict]:
    """One row per (prunable layer group, ratio): ``layer, ratio, metric, baseline, value, drop, params_removed``.

    ``drop`` is how much worse the metric got (accuracy points lost, loss or
    relative output MSE gained). ``metric='auto'`` picks accuracy on labeled
    classification batches, else loss when labeled, else ``output_mse``.
    ``executor.map(fn, items)`` runs the measurements (default: one by one); a node passes its ``ctx``
    (``ctx.map``: a Dask cluster when ``distributed_compression`` is on).
    """
    device = str(device)
    batches = [to_device(b, "cpu") for b in limited(loader, limit_batches or DEFAULT_BATCHES)]
    if not batches:
        raise ValueError("pruning_sensitivity: the loader yielded no batches")
    model = copy.deepcopy(model).to(device)
    reference = _outputs(model, batches, torch.device(device))
    metric = _resolve_metric(metric, batches, reference, loss_fn)
    baseline = 0.0 if metric == "output_mse" else _score(metric, reference, reference, batches, loss_fn)
    options = dict(importance=importance, importance_norm=importance_norm, round_to=round_to,
                   ignored_layers=tuple(ignored_layers))
    example = slice_inputs(split_batch(to_device(batches[0], device))[0],
                           min(2, batch_size(split_batch(batches[0])[0])))
    groups = make_pruner(copy.deepcopy(model), example, label="sensitivity", ratio=0.0, **options).group_names()
    if layers is not None:
        wanted = list(layers)
        unknown = [w for w in wanted if w not in groups]
        if unknown:
            raise ValueError(f"unknown layer group(s) {unknown}; prunable groups: {', '.join(groups)}")
        groups = wanted
    task = functools.partial(measure_group, model=model, batches=batches, reference=reference, baseline=baseline,
                             metric=metric, loss_fn=loss_fn, device=device, options=options)
    return list(per_layer(executor, task, [(g, float(r)) for g in groups for r in ratios]).values())
