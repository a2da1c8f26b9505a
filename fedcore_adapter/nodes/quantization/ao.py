"""The torch.ao flow shared by ``ptq_static`` and ``qat``: prepare (observers or fake quant), convert.

Two graph modes, recorded in the plan so a checkpoint replays the same one:

- ``fx``: the model is traced; conv+bn+relu and linear+relu are fused and
  tensors stay int8 from one layer to the next (fastest).
- ``eager``: each Linear/Conv (BatchNorm folded in) is wrapped as
  quantize -> int8 layer -> dequantize; works on models torch.fx cannot trace.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.ao.quantization import QuantWrapper

from ...data import call_model
from .backends import lsq_qconfig, qat_qconfig, qconfig_mapping, quantized_engine, quiet, static_qconfig
from .calibration import example_inputs
from .folding import conv_bn_pairs, fold_batchnorm_


def _layer_qconfig(plan: dict, module: nn.Module):
    """The qconfig of one quantized layer under ``plan`` (LSQ per-channel scales need the layer's width)."""
    engine = plan["engine"]
    if plan["method"] == "qat":
        if plan.get("learnable"):
            return lsq_qconfig(engine, module.weight.shape[0] if plan["per_channel"] else None)
        return qat_qconfig(engine, plan["per_channel"])
    return static_qconfig(engine, plan["per_channel"], plan["observer"], plan.get("percentile", 99.99))


def _default_qconfig(plan: dict):
    if plan["method"] == "qat":
        if plan.get("learnable"):
            return lsq_qconfig(plan["engine"], None)
        return qat_qconfig(plan["engine"], plan["per_channel"])
    return static_qconfig(plan["engine"], plan["per_channel"], plan["observer"], plan.get("percentile", 99.99))


def _prepare_fx(model: nn.Module, plan: dict) -> nn.Module:
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    is_qat = plan["method"] == "qat"
    mapping = qconfig_mapping(_default_qconfig(plan), plan["engine"], is_qat)
    for name in plan["keep_float"]:
        mapping.set_module_name(name, None)
    if is_qat and plan.get("learnable") and plan["per_channel"]:
        for name in plan["layers"]:
            mapping.set_module_name(name, _layer_qconfig(plan, model.get_submodule(name)))
    inputs = example_inputs(plan["inputs"])
    if is_qat:
        return prepare_qat_fx(model.train(), mapping, inputs)
    return prepare_fx(model.eval(), mapping, inputs)


def _prepare_eager(model: nn.Module, plan: dict) -> nn.Module:
    from torch.ao.quantization import prepare, prepare_qat

    model.eval()
    fold_batchnorm_(model, [tuple(p) for p in plan["folded_bn"]])
    for name in plan["layers"]:
        wrapper = QuantWrapper(model.get_submodule(name))
        wrapper.qconfig = _layer_qconfig(plan, wrapper.module)
        model.set_submodule(name, wrapper)
    if plan["method"] == "qat":
        return prepare_qat(model.train(), inplace=True)
    return prepare(model, inplace=True)


def prepare_model(model: nn.Module, plan: dict) -> nn.Module:
    """Insert observers (static) or fake quantization (qat) as ``plan`` says."""
    with quiet(), quantized_engine(plan["engine"]):
        return _prepare_fx(model, plan) if plan["graph"] == "fx" else _prepare_eager(model, plan)


def convert_model(prepared: nn.Module, plan: dict) -> nn.Module:
    """The real int8 model: packed weights, calibrated scales, int8 kernels."""
    from torch.ao.quantization import convert
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = prepared.cpu().eval()
    with quiet(), quantized_engine(plan["engine"]):
        return convert_fx(prepared) if plan["graph"] == "fx" else convert(prepared, inplace=True)


@torch.no_grad()
def calibrate(prepared: nn.Module, batches: list[Any], passes: int = 1) -> None:
    prepared.eval()
    with quiet():
        for _ in range(passes):
            for inputs in batches:
                call_model(prepared, inputs)


def base_plan(method: str, config: Any, layers: dict[str, str], keep_float: set[str], graph: str,
              inputs_spec: list[dict] | None, model: nn.Module) -> dict:
    """The JSON record of a static/QAT quantization (what ``prepare_model``/``convert_model`` follow)."""
    chosen = {n: k for n, k in layers.items() if n not in keep_float}
    convs = {n for n, k in chosen.items() if k == "conv"}
    return {
        "method": method,
        "engine": config.backend,
        "per_channel": config.per_channel,
        "graph": graph,
        "layers": chosen,
        "keep_float": sorted(keep_float),
        "inputs": inputs_spec,
        "folded_bn": [list(p) for p in conv_bn_pairs(model) if p[0] in convs] if graph == "eager" and convs else [],
    }
