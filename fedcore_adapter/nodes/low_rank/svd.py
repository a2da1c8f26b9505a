"""The math: a layer as a matrix ``M = A @ B``, its SVD, and rank-``r`` factors back into layers.

Every factorisable layer is seen as one matrix ``M`` (rows x cols) such that
a rank-``r`` product ``A @ B`` (``A``: rows x r, ``B``: r x cols) maps onto a
:class:`FactorizedLayer` whose parameters are exactly ``r * (rows + cols)``
plus the bias:

- Linear: ``M = W`` (out x in); ``B`` -> ``first``, ``A`` -> ``second``
- Conv, channel: ``M = W.reshape(out, in*k...)``; ``B`` -> the k-sized conv, ``A`` -> the 1x1 conv
- Conv2d, spatial: ``M[(c, i), (o, j)] = W[o, c, i, j]`` (in*kh x out*kw); ``A`` -> the kh x 1 conv,
  ``B`` -> the 1 x kw conv
- Embedding: ``M = W`` (num x dim); ``A`` -> the r-wide Embedding, ``B`` -> the Linear
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import FactorizedLayer, io_dims

Tensor = torch.Tensor


def spatial_ok(module: nn.Module) -> bool:
    """A Conv2d that the spatial (kh x 1 then 1 x kw) form reproduces exactly."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and min(module.kernel_size) > 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def effective_mode(module: nn.Module, requested: str) -> str:
    """The form a layer gets: ``spatial`` only where :func:`spatial_ok`, else ``channel``."""
    if isinstance(module, FactorizedLayer):
        return module.mode
    return "spatial" if requested == "spatial" and spatial_ok(module) else "channel"


def weight_matrix(module: nn.Module, mode: str) -> Tensor:
    """The layer's matrix ``M`` (float64, detached, on the CPU)."""
    if isinstance(module, FactorizedLayer):
        a, b = factors_of(module)
        return a @ b
    w = module.weight.detach().to("cpu", torch.float64)
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return w.clone()
    if mode == "spatial":
        out, cin, kh, kw = w.shape
        return w.permute(1, 2, 0, 3).reshape(cin * kh, out * kw)
    return w.reshape(w.shape[0], -1)


def matrix_to_weight(m: Tensor, module: nn.Module, mode: str) -> Tensor:
    """Inverse of :func:`weight_matrix` for a plain layer (the weight tensor of shape ``module.weight``)."""
    shape = module.weight.shape
    if mode == "spatial":
        out, cin, kh, kw = shape
        return m.reshape(cin, kh, out, kw).permute(2, 0, 1, 3).contiguous()
    return m.reshape(shape).contiguous()


def svd(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in float64 (``U``, ``S`` descending, ``Vh``); the same on every machine up to rounding."""
    return torch.linalg.svd(m.to(torch.float64), full_matrices=False)


def split(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors ``A = U sqrt(S)``, ``B = sqrt(S) Vh`` (balanced norms train best)."""
    root = s[:rank].abs().sqrt()
    sign = torch.sign(s[:rank])
    sign[sign == 0] = 1
    return u[:, :rank] * (root * sign), root[:, None] * vh[:rank]


def factors_of(layer: FactorizedLayer) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of an existing factorised layer (float64), whatever shapes pruning left it with."""
    w1 = layer.first.weight.detach().to("cpu", torch.float64)
    w2 = layer.second.weight.detach().to("cpu", torch.float64)
    if layer.kind == "linear":
        return w2, w1
    if layer.kind == "embedding":
        return w1, w2.T
    if layer.mode == "spatial":  # first: (r, in, kh, 1), second: (out, r, 1, kw)
        r, cin, kh, _ = w1.shape
        out, _, _, kw = w2.shape
        return w1[..., 0].reshape(r, cin * kh).T, w2[:, :, 0, :].permute(1, 0, 2).reshape(r, out * kw)
    return w2.reshape(w2.shape[0], w2.shape[1]), w1.reshape(w1.shape[0], -1)


def _conv_like(module: nn.Module, cin: int, cout: int, kernel, stride, padding, dilation, bias: bool,
               padding_mode: str = "zeros") -> nn.Module:
    cls = nn.Conv1d if isinstance(module, nn.Conv1d) else nn.Conv2d
    return cls(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias,
               padding_mode=padding_mode)


def _plain(module: nn.Module) -> nn.Module:
    """The layer whose hyper-parameters a (re)factorisation copies."""
    return module.first if isinstance(module, FactorizedLayer) else module


def _bias(module: nn.Module):
    layer = module.second if isinstance(module, FactorizedLayer) else module
    return getattr(layer, "bias", None)


def build_factorized(module: nn.Module, mode: str, rank: int) -> FactorizedLayer:
    """An empty :class:`FactorizedLayer` of rank ``rank`` replacing ``module`` (same device and dtype)."""
    cin, cout = io_dims(module)
    plain = _plain(module)
    has_bias = _bias(module) is not None
    if isinstance(plain, nn.Embedding):
        first = nn.Embedding(cin, rank, padding_idx=plain.padding_idx)
        second, kind = nn.Linear(rank, cout, bias=False), "embedding"
    elif isinstance(plain, nn.Linear):
        first, second, kind = nn.Linear(cin, rank, bias=False), nn.Linear(rank, cout, bias=has_bias), "linear"
    elif mode == "spatial":
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _conv_geometry(module)
        first = nn.Conv2d(cin, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), bias=False)
        second = nn.Conv2d(rank, cout, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), bias=has_bias)
        kind = "conv"
    else:
        first = _conv_like(plain, cin, rank, plain.kernel_size, plain.stride, plain.padding, plain.dilation, False,
                           plain.padding_mode)
        ones = (1,) * len(plain.kernel_size)
        second, kind = _conv_like(plain, rank, cout, ones, ones, 0, ones, has_bias), "conv"
    weight = (module.second if isinstance(module, FactorizedLayer) else module).weight
    return FactorizedLayer(first, second, kind, mode).to(weight.device, weight.dtype)


def _conv_geometry(module: nn.Module):
    """Kernel, stride, padding, dilation of a spatial conv (plain or already factorised)."""
    if isinstance(module, FactorizedLayer):
        f, s = module.first, module.second
        return ((f.kernel_size[0], s.kernel_size[1]), (f.stride[0], s.stride[1]), (f.padding[0], s.padding[1]),
                (f.dilation[0], s.dilation[1]))
    return module.kernel_size, module.stride, module.padding, module.dilation


@torch.no_grad()
def load_factors(layer: FactorizedLayer, a: Tensor, b: Tensor, bias) -> FactorizedLayer:
    """Write ``A`` (rows x r) and ``B`` (r x cols) into ``layer``'s two weights, and the original bias."""
    w1, w2 = layer.first.weight, layer.second.weight
    if layer.kind == "linear":
        w1.copy_(b)
        w2.copy_(a)
    elif layer.kind == "embedding":
        w1.copy_(a)
        w2.copy_(b.T)
    elif layer.mode == "spatial":
        r, cin, kh, _ = w1.shape
        out, _, _, kw = w2.shape
        w1.copy_(a.T.reshape(r, cin, kh, 1))
        w2.copy_(b.reshape(r, out, kw).permute(1, 0, 2).unsqueeze(2))
    else:
        w1.copy_(b.reshape(w1.shape))
        w2.copy_(a.reshape(w2.shape))
    if bias is not None:
        layer.second.bias.copy_(bias.detach())
    return layer


def factorize(module: nn.Module, mode: str, a: Tensor, b: Tensor,
              bias: Tensor | None | str = "keep") -> FactorizedLayer:
    """The :class:`FactorizedLayer` computing ``A @ B`` in place of ``module`` (its bias, or ``bias``)."""
    layer = build_factorized(module, mode, a.shape[1])
    return load_factors(layer, a, b, _bias(module) if isinstance(bias, str) else bias)
