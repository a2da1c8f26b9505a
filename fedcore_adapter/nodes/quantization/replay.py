"""Checkpoint replay of a quantization: rebuild the same int8 structure on a fresh float model.

The recorded plan (JSON) names the method, engine, graph mode, layers and folded
BatchNorms; replaying it on the float model rebuilt by the earlier records
(pruning, low-rank...) gives modules whose state dict -- packed int8 weights,
scales, zero points -- then loads with ``strict=True``. No data is needed: the
scales computed here on untrained observers are overwritten by the loaded ones.
Loading packs weights with the current engine; a plan made for another engine
(e.g. qnnpack) re-packs them after loading so outputs match the saved model.
"""
from __future__ import annotations

import functools

import torch
from torch.ao.nn.quantized.dynamic.modules.rnn import RNNBase as QuantizedRNN
from torch import nn

from ...structure import register_replay
from .ao import convert_model, prepare_model
from .backends import quantized_engine
from .dynamic import swap_dynamic_


@register_replay("quantize")
def replay_quantize(model: nn.Module, plan: dict) -> nn.Module:
    model = model.cpu().eval()
    if plan["method"] == "dynamic":
        model = swap_dynamic_(model, plan)
    else:
        model = convert_model(prepare_model(model, plan), plan)
    if plan["engine"] != torch.backends.quantized.engine:
        model.register_load_state_dict_post_hook(functools.partial(_repack_after_load, engine=plan["engine"]))
    return model


def _repack_after_load(model: nn.Module, _incompatible_keys, engine: str) -> None:
    """Re-pack loaded int8 weights with ``engine``'s kernels (loading packs them with the current engine)."""
    with quantized_engine(engine):
        for module in model.modules():
            if isinstance(module, QuantizedRNN):
                tensors = module._weight_bias()
                module.set_weight_bias({**tensors["weight"], **tensors["bias"]})
            elif hasattr(module, "_weight_bias") and hasattr(module, "set_weight_bias"):
                module.set_weight_bias(*module._weight_bias())
