"""``ptq_dynamic`` (FedCore ``post_dynamic_quant``): int8 weights, activations quantized on the fly.

Linear layers become torch.ao dynamic int8 Linears; with ``allow_conv``,
Conv1d/Conv2d (groups=1, BatchNorm folded in first) become ``Int8Conv``: the input
quantized per call, then a direct int8 convolution with float output (oneDNN), a
following ReLU fused into it; with ``allow_emb`` embeddings store int8 rows (``nn.Embedding`` subclasses
too when their eval forward is a plain lookup: ``embeddings``); with ``allow_rnn`` (the default) GRU/LSTM layers
run torch's int8 recurrent kernels (``recurrent``). A layer of an asked-for kind that these kernels cannot take
(a grouped conv, an LSTM with ``proj_size``...) stays float, named with why in the metrics row's note and a
warning (``selective.int8_capable``).
``smooth_alpha`` applies SmoothQuant: per input channel, activation
outliers are divided out and multiplied into the weights before quantization,
on the Linears where that cuts the layer's own int8 error at least
``smooth_min_gain`` times (elsewhere the extra multiply costs time for little).
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Optional

import torch
from torch import nn
from torch.ao.quantization import (default_dynamic_qconfig, float_qparams_weight_only_qconfig,
                                   per_channel_dynamic_qconfig)

from ...context import NodeContext
from ...data import call_model
from ...errors import NodeError
from ...registry import register_node
from .backends import quantized_engine, quiet
from ..toolkit import calibration_inputs, forward_hooks, write_report
from .calibration import check_engine
from .config import PTQDynamicConfig
from .conv import Int8Conv
from .embeddings import float_reason as embedding_float_reason, int8_embedding
from .folding import conv_bn_pairs, conv_relu_pairs, convs_feeding_convs, fold_batchnorm_
from .modules import DynamicConv, DynamicLinear, SmoothDynamicLinear, dynamic_conv_float_reason
from .ptq import auto_skip_layers, export_if_asked
from .recurrent import float_reason as recurrent_float_reason, int8_recurrent
from .selective import int8_capable, quantizable_layers, require_layers, skipped_by_patterns

METHOD = "dynamic"
FLOAT_REASONS = {"conv": dynamic_conv_float_reason, "embedding": embedding_float_reason,
                 "recurrent": recurrent_float_reason}


@torch.inference_mode()
def input_absmax(model: nn.Module, names: list[str], batches: list[Any]) -> dict[str, torch.Tensor]:
    """Per input channel max |x| seen by each named Linear over ``batches``."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str, _module: nn.Module, args: tuple) -> None:
        x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
        stats[name] = torch.maximum(stats[name], x) if name in stats else x

    model.eval()
    with forward_hooks(model, pre={n: functools.partial(hook, n) for n in names}):
        for inputs in batches:
            call_model(model, inputs)
    return stats


def smoothing_scales(weight: torch.Tensor, absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|x_j|^alpha / max|W_:j|^(1-alpha)`` (inputs are divided by ``s``)."""
    w = weight.detach().abs().amax(0).float().clamp(min=1e-5)
    return (absmax.clamp(min=1e-5).pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def _qconfig(kind: str, per_channel: bool):
    if kind == "embedding":
        return float_qparams_weight_only_qconfig
    return per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig


def swap_dynamic_(model: nn.Module, plan: dict, scales: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """Replace the plan's float layers by int8 ones in place (BatchNorm folded first); ``scales``: SmoothQuant."""
    scales = scales or {}
    smoothed = set(plan["smoothed"])
    fused_relu = dict(plan.get("fused_relu", []))
    channels_last = set(plan.get("channels_last", []))
    with quiet(), quantized_engine(plan["engine"]):
        fold_batchnorm_(model, [tuple(p) for p in plan["folded_bn"]])
        for relu in fused_relu.values():
            model.set_submodule(relu, nn.Identity())
        for name, kind in plan["layers"].items():
            module = model.get_submodule(name)
            module.qconfig = _qconfig(kind, plan["per_channel"])
            if kind == "embedding":
                model.set_submodule(name, int8_embedding(module))
                continue
            if kind == "recurrent":
                model.set_submodule(name, int8_recurrent(module))
                continue
            if name in smoothed:
                s = scales.get(name, torch.ones(module.in_features))
                with torch.no_grad():
                    module.weight.mul_(s.to(module.weight.dtype))
                quantized = SmoothDynamicLinear.from_float(module)
                quantized.input_scale.copy_(1 / s)
            elif kind == "conv" and plan.get("conv_kernel", "im2col") == "im2col":  # plans written before Int8Conv
                quantized = DynamicConv.from_conv(module)
            elif kind == "conv":
                quantized = Int8Conv.from_conv(module, relu=name in fused_relu)
                quantized.channels_last_output = name in channels_last
            else:
                quantized = DynamicLinear.from_float(module)
            quantized.activation_range = plan["activation_range"]
            model.set_submodule(name, quantized)
    return model


def make_plan(model: nn.Module, layers: dict[str, str], keep_float: frozenset, config: PTQDynamicConfig,
              smoothed: frozenset = frozenset()) -> dict:
    """The JSON record of what ``swap_dynamic_`` does (also what the checkpoint replays)."""
    chosen = {n: k for n, k in layers.items() if n not in keep_float}
    convs = {n for n, k in chosen.items() if k == "conv"}
    folded_bn = [p for p in conv_bn_pairs(model) if p[0] in convs] if convs else []
    fused_relu = conv_relu_pairs(model, convs, folded_bn) if convs else []
    passed_through = {bn for _, bn in folded_bn} | {relu for _, relu in fused_relu}
    return {
        "method": METHOD,
        "engine": config.backend,
        "per_channel": config.per_channel,
        "activation_range": config.activation_range,
        "layers": chosen,
        "smoothed": [n for n in chosen if n in smoothed],
        "folded_bn": [list(p) for p in folded_bn],
        "conv_kernel": "int8_conv",
        "fused_relu": [list(p) for p in fused_relu],
        "channels_last": convs_feeding_convs(model, convs, passed_through) if convs else [],
    }


def quantize_dynamic_model(model: nn.Module, keep_float: frozenset, layers: dict[str, str],
                           config: PTQDynamicConfig, absmax: dict[str, torch.Tensor],
                           smoothed: frozenset = frozenset()) -> tuple[nn.Module, dict]:
    """Quantize ``model`` in place, keeping ``keep_float`` layers in float; returns it and its plan."""
    plan = make_plan(model, layers, keep_float, config, smoothed)
    scales = {n: smoothing_scales(model.get_submodule(n).weight, absmax[n], config.smooth_alpha)
              for n in plan["smoothed"]}
    return swap_dynamic_(model, plan, scales), plan


def _quantized(model: nn.Module, keep_float: frozenset, layers: dict, config: PTQDynamicConfig, absmax: dict,
               smoothed: frozenset = frozenset()):
    return quantize_dynamic_model(model, keep_float, layers, config, absmax, smoothed)[0]


def _one_layer(module: nn.Module, scale: Optional[torch.Tensor], config: PTQDynamicConfig) -> nn.Module:
    """``module`` alone as a dynamic int8 Linear, SmoothQuant-scaled when ``scale`` is given."""
    plan = {"engine": config.backend, "per_channel": config.per_channel, "activation_range": config.activation_range,
            "layers": {"0": "linear"}, "smoothed": ["0"] if scale is not None else [], "folded_bn": []}
    return swap_dynamic_(nn.Sequential(copy.deepcopy(module)), plan, {"0": scale} if scale is not None else None)[0]


@torch.inference_mode()
def smoothing_gains(model: nn.Module, names: list[str], batches: list[Any], absmax: dict[str, torch.Tensor],
                    config: PTQDynamicConfig) -> dict[str, float]:
    """Per Linear: its int8 output error without SmoothQuant divided by the error with it (on ``batches``).

    Each layer is measured alone, on the inputs it sees in the float model.
    """
    pairs = {}
    for n in names:
        module = model.get_submodule(n)
        pairs[n] = (_one_layer(module, None, config),
                    _one_layer(module, smoothing_scales(module.weight, absmax[n], config.smooth_alpha), config))
    errors = {n: [0.0, 0.0] for n in names}

    def hook(name: str, _module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        plain, smooth = pairs[name]
        errors[name][0] += float((plain(args[0]) - out).pow(2).sum())
        errors[name][1] += float((smooth(args[0]) - out).pow(2).sum())

    model.eval()
    with forward_hooks(model, {n: functools.partial(hook, n) for n in names}):
        for inputs in batches:
            call_model(model, inputs)
    return {n: e[0] / max(e[1], 1e-30) for n, e in errors.items()}


@register_node(PTQDynamicConfig)
def apply_ptq_dynamic(model: nn.Module, config: PTQDynamicConfig, ctx: NodeContext) -> nn.Module:
    label = ctx.node_label or config.label
    check_engine(config.backend, label)
    kinds = ["linear"] + ["conv"] * config.allow_conv + ["embedding"] * config.allow_emb
    kinds += ["recurrent"] * config.allow_rnn
    found = quantizable_layers(model, kinds, subclasses=["embedding"])
    layers = int8_capable(model, found, FLOAT_REASONS, ctx, label)
    require_layers(layers, label, kinds)
    keep_float = skipped_by_patterns(layers, config.skip, label, found.keys() - layers.keys())
    recurrent = [n for n, k in layers.items() if k == "recurrent" and n not in keep_float]
    if config.export and recurrent:
        raise NodeError(label, f"export=true cannot write int8 GRU/LSTM layers ({', '.join(recurrent)}) into a "
                               f"torch.export archive; set allow_rnn=false (they stay float) or export=false")
    batches: list = []
    if config.smooth_alpha is not None or config.auto_skip is not None:
        batches = calibration_inputs(ctx, ctx.limit("valid", config.calibration_batches), label=label,
                                     purpose="smooth_alpha" if config.smooth_alpha is not None else "auto_skip")
    work = copy.deepcopy(model).cpu().eval()
    linears = [n for n, k in layers.items() if k == "linear" and n not in keep_float]
    absmax, smoothed = {}, frozenset()
    if config.smooth_alpha is not None:
        absmax = input_absmax(work, linears, batches)
        gains = smoothing_gains(work, linears, batches, absmax, config)
        smoothed = frozenset(n for n, g in gains.items() if g >= config.smooth_min_gain)
        write_report(ctx, "smoothing.json", {"alpha": config.smooth_alpha, "min_gain": config.smooth_min_gain,
                                             "error_ratio": gains, "smoothed": sorted(smoothed)})
    quantize = functools.partial(_quantized, layers=layers, config=config, absmax=absmax, smoothed=smoothed)
    keep_float = auto_skip_layers(ctx, config.auto_skip, quantize, work, batches, layers, keep_float)
    quantized, plan = quantize_dynamic_model(work, frozenset(keep_float), layers, config, absmax, smoothed)
    ctx.record_structure("quantize", plan)
    export_if_asked(quantized, config, batches or None, ctx, label)
    return quantized
