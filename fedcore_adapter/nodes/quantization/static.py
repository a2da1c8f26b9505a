"""``ptq_static`` (FedCore ``post_training_quant``): observers calibrated on validation batches
(min-max, moving average, histogram or percentile), per-channel int8 weights, then conversion
to int8 kernels (conv+bn+relu fused in FX graph mode). A convolution torch's int8 convolution cannot
take (circular/replicate or ``'same'`` padding) stays float, named with why in the metrics row's note."""
from __future__ import annotations

import copy
import functools
import logging
from typing import Any

from torch import nn

from ...context import NodeContext
from ...errors import NodeError
from ...registry import register_node
from .ao import base_plan, calibrate, convert_model, prepare_model
from ..toolkit import calibration_inputs
from .calibration import check_engine, input_spec
from .config import PTQStaticConfig
from .ptq import auto_skip_layers, export_if_asked
from .selective import int8_capable, quantizable_layers, require_layers, skipped_by_patterns

log = logging.getLogger("fedcore_adapter")
KINDS = ("linear", "conv")


def conv_float_reason(conv: nn.Module) -> str | None:
    """Why torch's int8 convolution (``torch.ao.nn.quantized``) cannot take ``conv``; None if it can."""
    if conv.padding_mode not in ("zeros", "reflect"):
        return f"padding_mode={conv.padding_mode!r}: torch's int8 convolution pads with zeros or reflect only"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}: torch's int8 convolution takes numeric padding only"
    return None


def int8_layers(model: nn.Module, skip: list[str], ctx: NodeContext, label: str) -> tuple[dict[str, str], set[str]]:
    """``({layer: kind}`` to quantize, the names kept float``)``: ``skip`` matches and the convolutions torch's int8
    kernels cannot take (named in the metrics row's note, ``selective.int8_capable``; kept float in fx mode too)."""
    found = quantizable_layers(model, KINDS)
    layers = int8_capable(model, found, {"conv": conv_float_reason}, ctx, label)
    require_layers(layers, label, KINDS)
    kept_float = found.keys() - layers.keys()
    return layers, skipped_by_patterns(layers, skip, label, kept_float) | kept_float


def static_plan(config: Any, layers: dict, keep_float: set, graph: str, example: Any, model: nn.Module,
                method: str = "static") -> dict:
    plan = base_plan(method, config, layers, keep_float, graph, input_spec(example) if graph == "fx" else None, model)
    if method == "static":
        plan.update(observer=config.observer, percentile=config.percentile)
    return plan


def choose_graph(model: nn.Module, config: Any, layers: dict, keep_float: set, example: Any, label: str,
                 method: str = "static") -> str:
    """``fx`` when the model traces and runs prepared (``auto``), else ``eager``; an explicit choice is checked."""
    if config.graph_mode == "eager":
        return "eager"
    if isinstance(example, dict):
        reason = "its inputs are a dict of tensors (keyword arguments)"
    else:
        try:
            plan = static_plan(config, layers, keep_float, "fx", example, model, method)
            calibrate(prepare_model(copy.deepcopy(model), plan), [example])
            return "fx"
        except Exception as err:  # noqa: BLE001 - any tracing failure means "not traceable"
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if config.graph_mode == "fx":
        raise NodeError(label, f"graph_mode='fx' but torch.fx cannot trace the model ({reason}); use graph_mode=eager")
    log.info("%s: torch.fx cannot trace the model (%s); quantizing layer by layer (eager)", label, reason)
    return "eager"


def quantize_static_model(model: nn.Module, keep_float: frozenset, config: PTQStaticConfig, layers: dict,
                          graph: str, batches: list) -> tuple[nn.Module, dict]:
    """Prepare, calibrate over ``batches`` (``config.epochs`` passes) and convert ``model`` (consumed)."""
    plan = static_plan(config, layers, set(keep_float), graph, batches[0], model)
    prepared = prepare_model(model, plan)
    calibrate(prepared, batches, config.epochs)
    return convert_model(prepared, plan), plan


def _quantized(model: nn.Module, keep_float: frozenset, config: PTQStaticConfig, layers: dict, graph: str,
               batches: list) -> nn.Module:
    return quantize_static_model(model, keep_float, config, layers, graph, batches)[0]


@register_node(PTQStaticConfig)
def apply_ptq_static(model: nn.Module, config: PTQStaticConfig, ctx: NodeContext) -> nn.Module:
    label = ctx.node_label or config.label
    check_engine(config.backend, label)
    layers, keep_float = int8_layers(model, config.skip, ctx, label)
    batches = calibration_inputs(ctx, ctx.limit("valid", config.calibration_batches), purpose="static quantization",
                                 label=label)
    work = copy.deepcopy(model).cpu().eval()
    graph = choose_graph(work, config, layers, keep_float, batches[0], label)
    quantize = functools.partial(_quantized, config=config, layers=layers, graph=graph, batches=batches)
    keep_float = auto_skip_layers(ctx, config.auto_skip, quantize, work, batches, layers, keep_float)
    quantized, plan = quantize_static_model(work, frozenset(keep_float), config, layers, graph, batches)
    ctx.record_structure("quantize", plan)
    export_if_asked(quantized, config, batches, ctx, label)
    return quantized
