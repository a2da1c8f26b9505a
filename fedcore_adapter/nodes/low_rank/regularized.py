"""FedCore's training flow: layers as trainable ``U, S, Vh`` with Hoyer and orthogonality losses.

Each target layer becomes an :class:`SVDParametrized` layer computing its
weight as ``U diag(S) Vh`` (full rank at first). Training adds to the task loss

- ``hoyer_loss x mean over layers of ||S||_1 / ||S||_2`` (pushes the spectrum to be sparse), and
- ``orthogonal_loss x mean over layers of (||U^T U - I||^2 + ||Vh Vh^T - I||^2) / r``
  (keeps U and Vh orthonormal, so truncating small S loses little).

:func:`trained_spectrum` then reads each layer back as ``U, s, Vh`` with ``s``
sorted descending (signs folded into U), ready for a rank strategy.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FactorizedLayer
from .sensitivity import Spectrum
from .svd import _bias, matrix_to_weight, svd, weight_matrix


def dense_equivalent(module: FactorizedLayer, mode: str) -> nn.Module:
    """A plain layer (on 'meta': geometry only) computing what a factorised layer computes."""
    f, s = module.first, module.second
    with torch.device("meta"):
        if module.kind == "linear":
            return nn.Linear(f.in_features, s.out_features, bias=s.bias is not None)
        if module.kind == "embedding":
            return nn.Embedding(f.num_embeddings, s.out_features, padding_idx=f.padding_idx)
        cls = type(f)
        if mode == "spatial":
            return cls(f.in_channels, s.out_channels, (f.kernel_size[0], s.kernel_size[1]),
                       stride=(f.stride[0], s.stride[1]), padding=(f.padding[0], s.padding[1]),
                       dilation=(f.dilation[0], s.dilation[1]), bias=s.bias is not None)
        return cls(f.in_channels, s.out_channels, f.kernel_size, stride=f.stride, padding=f.padding,
                   dilation=f.dilation, bias=s.bias is not None, padding_mode=f.padding_mode)


class SVDParametrized(nn.Module):
    """A layer whose weight is ``U diag(S) Vh`` (parameters ``U``, ``S``, ``Vh`` and the bias)."""

    def __init__(self, module: nn.Module, mode: str):
        super().__init__()
        weight = (module.second if isinstance(module, FactorizedLayer) else module).weight
        u, s, vh = svd(weight_matrix(module, mode))
        self.U = nn.Parameter(u.to(weight.device, weight.dtype))
        self.S = nn.Parameter(s.to(weight.device, weight.dtype))
        self.Vh = nn.Parameter(vh.to(weight.device, weight.dtype))
        bias = _bias(module)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.mode = mode
        # geometry (and, for a plain layer, the type to rebuild): kept out of the module tree and state dict
        template = module if not isinstance(module, FactorizedLayer) else dense_equivalent(module, mode)
        object.__setattr__(self, "template", template)
        object.__setattr__(self, "original", module)  # what the factors replace (and what the record names)

    def weight(self) -> torch.Tensor:
        return matrix_to_weight((self.U * self.S) @ self.Vh, self.template, self.mode)

    # While trained, a parametrized embedding still reads as an nn.Embedding (ptls's TrxEncoder reads these three).
    @property
    def num_embeddings(self) -> int:
        return self._embedding_attribute("num_embeddings")

    @property
    def embedding_dim(self) -> int:
        return self._embedding_attribute("embedding_dim")

    @property
    def padding_idx(self):
        return self._embedding_attribute("padding_idx")

    def _embedding_attribute(self, name: str):
        if not isinstance(self.template, nn.Embedding):
            raise AttributeError(f"a parametrized {type(self.template).__name__} layer has no {name} "
                                 f"(only a parametrized embedding)")
        return getattr(self.template, name)

    def forward(self, x):
        t, w = self.template, self.weight()
        if isinstance(t, nn.Linear):
            return F.linear(x, w, self.bias)
        if isinstance(t, nn.Embedding):
            return F.embedding(x, w, t.padding_idx)
        return t._conv_forward(x, w, self.bias)

    def dense(self) -> nn.Module:
        """The trained layer as a plain layer of the original type (full rank)."""
        weight = self.weight().detach()
        layer = copy.deepcopy(self.template).to(weight.device)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias.detach())
        return layer


def svd_layers(model: nn.Module) -> list[SVDParametrized]:
    return [m for m in model.modules() if isinstance(m, SVDParametrized)]


def hoyer(model: nn.Module) -> torch.Tensor:
    """Mean over SVD layers of ||S||_1 / ||S||_2."""
    layers = svd_layers(model)
    terms = [m.S.abs().sum() / m.S.norm().clamp_min(1e-12) for m in layers]
    return torch.stack(terms).mean()


def orthogonality(model: nn.Module) -> torch.Tensor:
    """Mean over SVD layers of (||U^T U - I||_F^2 + ||Vh Vh^T - I||_F^2) / r."""
    terms = []
    for m in svd_layers(model):
        r = m.S.shape[0]
        eye = torch.eye(r, device=m.S.device, dtype=m.S.dtype)
        terms.append(((m.U.T @ m.U - eye).pow(2).sum() + (m.Vh @ m.Vh.T - eye).pow(2).sum()) / r)
    return torch.stack(terms).mean()


def regularizer(hoyer_weight: float, orthogonal_weight: float):
    """``fn(model) -> loss`` for :func:`fedcore_adapter.trainer.train`."""

    def loss(model: nn.Module) -> torch.Tensor:
        total = hoyer(model) * hoyer_weight if hoyer_weight else 0.0
        if orthogonal_weight:
            total = total + orthogonal_weight * orthogonality(model)
        return total

    return loss


def trained_spectrum(name: str, layer: SVDParametrized) -> Spectrum:
    """``U, s, Vh`` of a trained layer, ``s = |S|`` sorted descending (signs folded into U)."""
    s = layer.S.detach().double().cpu()
    order = torch.argsort(s.abs(), descending=True, stable=True)
    u = layer.U.detach().double().cpu()[:, order] * torch.sign(s[order]).masked_fill(s[order] == 0, 1)
    return Spectrum(name, u, s[order].abs(), layer.Vh.detach().double().cpu()[order])
