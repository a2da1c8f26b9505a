"""``low_rank`` node (FedCore ``low_rank_model``): find the layers, check the request, run the method's
pipeline (:mod:`.svd_pipeline` or :mod:`.falor_pipeline`), record the structure, fine-tune."""
from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from ...context import NodeContext
from ...errors import NodeError
from ...registry import register_node
from ...results import write_json
from ...trainer import train
from . import falor_pipeline, svd_pipeline
from .allocation import budget_total, minimum_total
from .calibration import calibration_inputs
from .config import LowRankConfig
from .decompose_config import FILE_NAME, new_config
from .targets import Target, make_target, probe_positions

log = logging.getLogger("fedcore_adapter.low_rank")
# method name -> its module: candidates, mode, check, run, CAN_FACTORISE
PIPELINES = {"svd": svd_pipeline, "falor": falor_pipeline}


def _check_budget(config: LowRankConfig, targets: dict[str, Target], model: nn.Module, inputs: Any,
                  label: str) -> None:
    budget = config.method.budget
    if budget is None:
        return
    total, target = budget_total(budget, model, inputs)
    floor = minimum_total(list(targets.values()), total, budget.metric)
    if floor > target:
        given = f"ratio = {budget.ratio}" if budget.ratio is not None else f"value = {budget.value}"
        raise NodeError(label, f"budget.{given} ({budget.metric}) cannot be met: the smallest model "
                               f"reachable has {floor} {budget.metric} ({floor / total:.3f} of {total}); "
                               f"allowed: a target of at least {floor / total:.3f}")


def _nothing_to_factorise(config: LowRankConfig, ctx: NodeContext, label: str) -> dict:
    """The record of a node that found no layer it may factorise (also its metrics row's ``note``): the run goes
    on with the model unchanged."""
    reason = (f"no layer to factorise: none of the model's layers is a {'/'.join(config.layer_types)} layer that "
              f"method {config.method.name!r} can factorise{PIPELINES[config.method.name].CAN_FACTORISE} and that "
              f"include/exclude and shared weights leave")
    log.warning("node %s: %s", label, reason)
    ctx.note(reason)
    return new_config(config.method.name, {"skipped": reason})


def _needs_input(params) -> bool:
    """The fine-tune distils from the input model (a copy: factorising works in place)."""
    return params.epochs > 0 and params.distill is not False


@register_node(LowRankConfig)
def apply_low_rank(model: nn.Module, config: LowRankConfig, ctx: NodeContext) -> nn.Module:
    """Factorise the chosen layers, write ``decompose_config.json``, record the structure, fine-tune."""
    label = ctx.node_label or config.label
    pipeline = PIPELINES[config.method.name]
    node_input = copy.deepcopy(model).eval() if _needs_input(config.finetune_params) else None
    layers = pipeline.candidates(model, config)
    if layers:
        inputs = calibration_inputs(ctx, config.calibration_batches)
        extents = probe_positions(model, inputs[0], [n for n, _ in layers])
        targets = {n: make_target(n, m, pipeline.mode(config.method), extents.get(n, {})) for n, m in layers}
        pipeline.check(config.method, targets, label)
        _check_budget(config, targets, model, inputs[0], label)
        model, record = pipeline.run(model, config, ctx, targets, inputs, label)
    else:
        targets, record = {}, _nothing_to_factorise(config, ctx, label)
    record["meta"].update({"node": label, "layers_considered": len(targets), "layers_replaced": len(record["layers"])})
    if targets and not record["layers"]:
        reason = "no layer was factorised: no rank both met the thresholds and saved parameters"
        log.warning("node %s: %s", label, reason)
        ctx.note(reason)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(ctx.output_dir / FILE_NAME, record)
    if record["layers"]:
        ctx.record_structure("low_rank", record)
    if config.finetune_params.epochs:
        train(model, ctx, config.finetune_params, tag="finetune", node_input=node_input, recovery=True)
    return model
