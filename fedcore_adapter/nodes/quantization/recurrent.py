"""Dynamic int8 GRU and LSTM: torch's quantized recurrent kernels, saved as plain int8 tensors.

``torch.ao.nn.quantized.dynamic.GRU/LSTM`` hold their weights in packed cell objects
(TorchScript classes) that a ``weights_only`` load refuses. These subclasses save every
layer's weights as plain int8 tensors and biases as float tensors under the float
layer's own names (``weight_ih_l0``, ``bias_hh_l1_reverse``...), each weight's scales beside
it as float32 (``weight_ih_l0_scale``: what the int8 kernel itself keeps; a quantized
tensor would save them as float64 with int64 zero points, ~9 % of a GRU-256 checkpoint),
its zero points only when not all zero, and re-pack them on load, so a checkpoint holds
tensors only and the replayed plan rebuilds the module. Checkpoints holding quantized
weight tensors (the earlier format) still load.
"""
from __future__ import annotations

import torch
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn
from torch.ao.nn.quantized.dynamic.modules.rnn import PackedParameter

FLOAT_TYPES = (nn.GRU, nn.LSTM)


def float_reason(module: nn.Module) -> str | None:
    """Why ``module`` is not what torch's int8 recurrent kernels cover (GRU/LSTM with biases, no LSTM
    projection); None if it is."""
    name = type(module).__name__
    if type(module) not in FLOAT_TYPES:
        return f"{name}: the int8 recurrent kernels take GRU/LSTM only"
    if getattr(module, "proj_size", 0) > 0:
        return "LSTM with proj_size > 0: torch's int8 recurrent kernels have no projection"
    if not module.bias:
        return f"{name} with bias=False: torch's int8 recurrent kernels need biases"
    return None


class _Packed(PackedParameter):
    """A packed cell kept out of the state dict (its owner saves its tensors)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, *args, **kwargs):
        pass


def _compact(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A qint8 weight as ``{name: int8, name_scale: float32[, name_zero_point: int8]}``."""
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale, zero_point = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
    else:
        scale, zero_point = torch.tensor(weight.q_scale()), torch.tensor(weight.q_zero_point())
    out = {name: weight.int_repr(), f"{name}_scale": scale.float()}
    if bool(zero_point.any()):
        out[f"{name}_zero_point"] = zero_point.to(torch.int8)
    return out


def _quantized(state_dict: dict, key: str) -> torch.Tensor:
    """The qint8 weight saved by :func:`_compact` under ``key`` (or a quantized tensor saved as is)."""
    weight = state_dict[key]
    if weight.is_quantized:
        return weight
    scale = state_dict[f"{key}_scale"].double()
    zero_point = state_dict.get(f"{key}_zero_point", torch.zeros(scale.shape, dtype=torch.int8)).long()
    if scale.dim() == 0:
        return torch._make_per_tensor_quantized_tensor(weight, float(scale), int(zero_point))
    return torch._make_per_channel_quantized_tensor(weight, scale, zero_point, 0)


class _PortableRecurrent:
    """Mix-in for torch's dynamic RNNs: state dict of int8 weight / float bias tensors."""

    def _weight_names(self) -> list[str]:
        suffixes = ("", "_reverse")[:2 if self.bidirectional else 1]
        return [f"{kind}_{ihhh}_l{layer}{suffix}" for layer in range(self.num_layers) for suffix in suffixes
                for kind in ("weight", "bias") for ihhh in ("ih", "hh")]

    def _hide_packed(self) -> None:
        for packed in self._all_weight_values:
            packed.__class__ = _Packed

    def set_weight_bias(self, weight_bias_dict):
        super().set_weight_bias(weight_bias_dict)
        self._hide_packed()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        tensors = self._weight_bias()
        for name in self._weight_names():
            value = tensors[name.partition("_")[0]][name]
            if value.is_quantized:
                destination.update({prefix + k: v for k, v in _compact(name, value).items()})
            else:
                destination[prefix + name] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = self._weight_names()
        missing = [prefix + n for n in names if prefix + n not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        self.version = local_metadata.get("version", self.version)
        self.set_weight_bias({n: _quantized(state_dict, prefix + n) if n.startswith("weight")
                              else state_dict[prefix + n] for n in names})

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant=False):
        quantized = super().from_float(mod)
        quantized.__class__ = cls
        quantized._hide_packed()
        return quantized


class DynamicInt8GRU(_PortableRecurrent, nnqd.GRU):
    def _get_name(self) -> str:
        return "DynamicInt8GRU"


class DynamicInt8LSTM(_PortableRecurrent, nnqd.LSTM):
    def _get_name(self) -> str:
        return "DynamicInt8LSTM"


def int8_recurrent(module: nn.Module) -> nn.Module:
    """``module`` (its ``qconfig`` set) as a dynamic int8 GRU/LSTM."""
    return (DynamicInt8GRU if isinstance(module, nn.GRU) else DynamicInt8LSTM).from_float(module)
