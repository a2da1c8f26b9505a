"""Core aten forms of torch.ao's int8 modules, with the same numbers, for the ``export`` step.

``Int8Layer`` runs a quantized Linear/Conv as an int8 x int8 -> int32 GEMM
(``aten._int_mm``; convolutions as im2col) on ``torch.int8`` weight buffers;
activations are rounded to the int8 grid where the int8 model rounds them
(dynamic: per call, qparams chosen as fbgemm chooses them; static: the calibrated
input/output qparams). Grouped or 3-d static convolutions run in float on the
dequantized int8 weights; int8 activations and normalisations compute in float
and round to their output grid.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
import torch.nn.functional as F
from torch import nn

from .conv import Int8Conv
from .modules import DynamicConv, SmoothDynamicLinear, _reduce, dynamic_qparams, im2col_apply, int8_gemm

STATIC_LINEAR = (nnq.Linear, nniq.LinearReLU)
STATIC_CONV = (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d)
DYNAMIC = (nnqd.Linear, Int8Conv)  # our DynamicLinear, SmoothDynamicLinear and DynamicConv derive from nnqd.Linear


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """Round ``x`` to the uint8 grid ``[0, qmax]`` of ``scale``/``zero_point`` and back (plain aten ops)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, qmax)
    return (q - zero_point) * scale


def _int_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(int values, scale, zero point)`` of a quantized weight; per-tensor params become 1-element tensors."""
    if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return w.int_repr(), torch.tensor([w.q_scale()]), torch.tensor([float(w.q_zero_point())])
    # copies: the qparams of a temporary quantized tensor may alias memory freed with it
    return (w.int_repr(), w.q_per_channel_scales().to(torch.float32, copy=True),
            w.q_per_channel_zero_points().to(torch.float32, copy=True))


class Int8Layer(nn.Module):
    """A quantized Linear/Conv in core aten ops: int8 weights, int8 x int8 -> int32 GEMM, float scales."""

    def __init__(self, module: nn.Module, input_qparams: Optional[tuple[float, int]] = None):
        super().__init__()
        w, b = (module.weight(), module.bias) if isinstance(module, Int8Conv) else module._weight_bias()
        q, scale, zp = _int_weight(w)
        if bool((zp != 0).any()):
            raise NotImplementedError("int8 weights with non-zero zero points")
        self.dynamic = isinstance(module, DYNAMIC)
        self.geometry = dict(module.geometry) if isinstance(module, (DynamicConv, Int8Conv)) else None
        self.float_conv = None
        if not self.dynamic and q.dim() > 2:
            if q.dim() <= 4 and module.groups == 1 and module.padding_mode == "zeros":
                self.geometry = {"dims": q.dim() - 2, **{k: list(getattr(module, k)) for k in
                                                         ("kernel_size", "stride", "padding", "dilation")}}
            else:  # grouped / 3-d: float conv on the dequantized int8 weight
                self.float_conv = {k: getattr(module, k) for k in ("stride", "padding", "dilation", "groups")}
        self.register_buffer("qweight", q if self.float_conv else q.reshape(q.shape[0], -1).t().contiguous())
        self.register_buffer("colsum", q.reshape(q.shape[0], -1).sum(1, dtype=torch.int32))
        self.register_buffer("w_scale", scale)
        self.register_buffer("bias", b.detach().float() if b is not None else None)
        self.act_max = 127 if self.dynamic and _reduce(module) else 255
        self.relu = isinstance(module, (nniq.LinearReLU, nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d)) or (
            isinstance(module, Int8Conv) and module.relu)
        self.register_buffer("input_scale", module.input_scale.clone() if isinstance(module, SmoothDynamicLinear)
                             else None)
        if not self.dynamic:
            if input_qparams is None:
                raise NotImplementedError("a static int8 layer the example input never reached")
            self.register_buffer("in_scale", torch.tensor(float(input_qparams[0])))
            self.register_buffer("in_zero_point", torch.tensor(float(input_qparams[1])))
            self.register_buffer("out_scale", torch.tensor(float(module.scale)))
            self.register_buffer("out_zero_point", torch.tensor(float(int(module.zero_point))))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, in] -> [rows, out]`` in float, through the int8 GEMM."""
        if self.dynamic:
            if self.input_scale is not None:
                x = x * self.input_scale
            scale, zp = dynamic_qparams(x, self.act_max)
        else:
            scale, zp = self.in_scale, self.in_zero_point
        acc = int8_gemm(x, scale, zp, self.act_max, self.qweight, self.colsum)
        y = acc.float() * (scale * self.w_scale)
        return y + self.bias if self.bias is not None else y

    def _float_conv(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.float() * self.w_scale.view([-1] + [1] * (self.qweight.dim() - 1))
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.qweight.dim() - 3]
        return conv(x, w, self.bias, **self.float_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.float_conv is not None:
            y = self._float_conv(fake_quant(x, self.in_scale, self.in_zero_point, 255))
        elif self.geometry is not None:
            y = im2col_apply(x, self.geometry, self._matmul)
        else:
            y = self._matmul(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        if self.relu:
            y = F.relu(y)
        if self.dynamic:
            return y
        return fake_quant(y, self.out_scale, self.out_zero_point, 255)


class _RefEmbedding(nn.Module):
    """int8 embedding rows (float row-wise qparams), dequantized after the lookup."""

    def __init__(self, module: nn.Module):
        super().__init__()
        q, scale, zp = _int_weight(module.weight())
        self.register_buffer("qweight", q)
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero_point", zp)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(indices, self.qweight.float())
        return (rows - F.embedding(indices, self.w_zero_point[:, None])) * F.embedding(indices, self.w_scale[:, None])


class _RefQuantize(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.register_buffer("scale", module.scale.detach().float().reshape(()))
        self.register_buffer("zero_point", module.zero_point.detach().float().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.scale, self.zero_point, 255)


def _norm(module: nn.Module) -> Any:
    """The float computation of a quantized normalisation module (its float affine parameters and statistics)."""
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(module, nnq.LayerNorm):
        return functools.partial(F.layer_norm, normalized_shape=module.normalized_shape, weight=w, bias=b,
                                 eps=module.eps)
    if isinstance(module, nnq.GroupNorm):
        return functools.partial(F.group_norm, num_groups=module.num_groups, weight=w, bias=b, eps=module.eps)
    if isinstance(module, (nnq.InstanceNorm1d, nnq.InstanceNorm2d, nnq.InstanceNorm3d)):
        return functools.partial(F.instance_norm, weight=w, bias=b, eps=module.eps)
    return functools.partial(F.batch_norm, running_mean=module.running_mean, running_var=module.running_var,
                             weight=w, bias=b, training=False, eps=module.eps)


_POINTWISE = {  # quantized module -> its float function (output rounded to the module's own grid)
    nnq.Hardswish: lambda m: F.hardswish, nnq.Sigmoid: lambda m: torch.sigmoid,
    nnq.ELU: lambda m: functools.partial(F.elu, alpha=m.alpha),
    nnq.LeakyReLU: lambda m: functools.partial(F.leaky_relu, negative_slope=m.negative_slope),
    nnq.Softmax: lambda m: functools.partial(F.softmax, dim=m.dim),
    **{cls: _norm for cls in (nnq.LayerNorm, nnq.GroupNorm, nnq.InstanceNorm1d, nnq.InstanceNorm2d,
                              nnq.InstanceNorm3d, nnq.BatchNorm2d, nnq.BatchNorm3d)},
}


class _RefPointwise(nn.Module):
    """An int8 activation/normalisation module: its float function, then rounding to its output grid."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.fn = _POINTWISE[type(module)](module)
        scale, zp = (module.output_scale, module.output_zero_point) if isinstance(module, nnq.Sigmoid) \
            else (module.scale, module.zero_point)
        self.register_buffer("out_scale", torch.tensor(float(scale)))
        self.register_buffer("out_zero_point", torch.tensor(float(int(zp))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(self.fn(x), self.out_scale, self.out_zero_point, 255)


def reference_module(module: nn.Module, input_qparams: Optional[tuple[float, int]]) -> Optional[nn.Module]:
    if isinstance(module, DYNAMIC + STATIC_LINEAR + STATIC_CONV):
        return Int8Layer(module, input_qparams)
    if isinstance(module, nnq.Embedding):
        return _RefEmbedding(module)
    if isinstance(module, nnq.Quantize):
        return _RefQuantize(module)
    if isinstance(module, nnq.DeQuantize) or type(module) is nnq.Dropout:
        return nn.Identity()
    if type(module) is nnq.ReLU6:  # keeps its input's grid
        return nn.ReLU6()
    if type(module) in _POINTWISE:
        return _RefPointwise(module)
    return None
