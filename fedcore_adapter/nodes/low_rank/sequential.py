"""Sequential, error-compensating falor fit (``falor_fit='sequential'``): closed form, no training.

The layers are fitted in forward order. For each one, the calibration inputs ``x~`` come from the model
compressed so far (they carry the earlier layers' errors) while the target is the ORIGINAL layer's
output ``y = W x + b`` on the same tokens. The rank-k factors minimise ``E||y - (A B x~ + b')||^2``:

1. least squares with a ridge pulling towards ``W`` (no error: ``M = W`` exactly):
   ``M = (W C_xx~ + lam W)(C_x~x~ + lam I)^-1`` over centred statistics;
2. the best rank-k of ``M`` in the ``x~``-weighted norm: ``A`` = top-k eigenvectors of ``M C_x~x~ M^T``,
   ``B = A^T M`` (the residual of step 1 is orthogonal to every such choice);
3. the bias exact: ``b' = W E[x] + b - A B E[x~]`` (the mean output is kept, not projected away).

With ``falor_weighting='gradient'`` step 2 measures the error in the norm the model's output feels
(:mod:`.output_weights`). With ``falor_refit_kept`` the searched layers left at full rank get steps 1
and 3 too (same shape, no parameter added), so they also absorb the error compressed before them.
Layers fed by the same tensor (attention query, key, value) are fitted from one pass. Padded tokens of
a text batch are left out, as in every falor statistic. This is the GPTQ / SVD-LLM-v2 style idea: each
layer corrects the error accumulated before it instead of compounding it.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from ...data import call_model
from ..toolkit import evaluating, forward_hooks
from .calibration import token_rows
from .falor import top_eigenvectors

Tensor = torch.Tensor
Pair = tuple[torch.Tensor, torch.Tensor]  # (R, R^-1) of an output weighting


class _Stop(Exception):
    """Raised by a hook once the wanted inputs are captured: the rest of the forward pass is skipped."""


def layer_rows(module: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """A layer's input (or output) as rows x features (a 1x1 conv: channels at every position), padded tokens
    left out."""
    linear = isinstance(module, nn.Linear)
    return token_rows(x if linear else x.movedim(1, -1), mask, linear).double()


def _input_rows(model: nn.Module, name: str, inputs: Any) -> torch.Tensor:
    """Rows of the input ``model.<name>`` receives on one batch (the forward pass stops right there)."""
    module = model.get_submodule(name)
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    got = {}

    def hook(mod, args):
        got["rows"] = layer_rows(mod, args[0], mask)
        raise _Stop

    try:
        with forward_hooks(model, pre={module: hook}), torch.no_grad():
            call_model(model, inputs)
    except _Stop:
        pass
    if "rows" not in got:
        raise RuntimeError(f"layer {name} did not run in the forward pass")
    return got["rows"].cpu()


def forward_groups(model: nn.Module, names: list[str], inputs: Any) -> list[list[str]]:
    """``names`` in the order they run, layers fed by the same tensor (e.g. query/key/value) grouped."""
    seen: list[tuple[str, torch.Tensor]] = []  # the input tensors are held, so no address is reused

    def hook(name: str):
        def record(mod, args):
            if all(n != name for n, _ in seen):
                seen.append((name, args[0]))
        return record

    with forward_hooks(model, pre={name: hook(name) for name in names}), torch.no_grad():
        call_model(model, inputs)
    groups: list[list[str]] = []
    last = None
    for name, tensor in seen:
        if groups and tensor is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = tensor
    return groups


class _Cross:
    """Running sums for the centred ``C_x~x~``, ``C_xx~`` and both means (float64)."""

    def __init__(self):
        self.n, self.sx, self.st, self.tt, self.xt = 0, 0, 0, 0, 0

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        self.n += x.shape[0]
        self.sx = self.sx + x.sum(0)
        self.st = self.st + t.sum(0)
        self.tt = self.tt + t.T @ t
        self.xt = self.xt + x.T @ t

    def moments(self, centred: bool = True):
        """Means and the (centred, else raw) second moments ``C_x~x~``, ``C_xx~``."""
        mx, mt = self.sx / self.n, self.st / self.n
        if not centred:
            return torch.zeros_like(mx), torch.zeros_like(mt), self.tt / self.n, self.xt / self.n
        return mx, mt, self.tt / self.n - torch.outer(mt, mt), self.xt / self.n - torch.outer(mx, mt)


def _ridge(weight: torch.Tensor, ctt: torch.Tensor, cxt: torch.Tensor, damping: float) -> torch.Tensor:
    """Step 1: ``M = (W C_xx~ + lam W)(C_x~x~ + lam I)^-1``, ``lam`` = ``damping`` x the mean input variance."""
    lam = damping * float(ctt.diagonal().mean()) + 1e-12
    eye = torch.eye(ctt.shape[0], dtype=torch.float64)
    return torch.linalg.solve(ctt + lam * eye, (weight @ cxt + lam * weight).T).T


def _exact_bias(weight: torch.Tensor, bias: Optional[torch.Tensor], mx: torch.Tensor,
                fitted_mean: torch.Tensor) -> Optional[torch.Tensor]:
    """Step 3: ``b' = W E[x] + b - (the fit's mean output without bias)``; ``None`` for a layer without bias."""
    if bias is None:
        return None
    return weight @ mx + bias.detach().to("cpu", torch.float64) - fitted_mean


def fit_layer(weight: torch.Tensor, bias: Optional[torch.Tensor], stats: _Cross, rank: int,
              damping: float, output_weight: Optional[Pair] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(A, B, b')`` of rank ``rank`` for a layer ``W`` (out x in, float64), see the module docstring.
    A layer without a bias gets none (its fit uses uncentred moments, the mean included).
    ``output_weight``: ``(R, R^-1)``; the rank-k is then the best in the ``R``-weighted output norm
    (``A = R^-1 U``, ``B = U^T R M``, ``U`` the top eigenvectors of ``R M C M^T R``)."""
    mx, mt, ctt, cxt = stats.moments(centred=bias is not None)
    m = _ridge(weight, ctt, cxt, damping)
    if output_weight is None:
        a = top_eigenvectors(m @ ctt @ m.T)[:, :rank]
        b = a.T @ m
    else:
        r, r_inv = output_weight
        rm = r @ m
        u = top_eigenvectors(rm @ ctt @ rm.T)[:, :rank]
        a, b = r_inv @ u, u.T @ rm
    return a, b, _exact_bias(weight, bias, mx, a @ (b @ mt))


def refit_full(weight: torch.Tensor, bias: Optional[torch.Tensor], stats: _Cross,
               damping: float) -> tuple[Tensor, Optional[Tensor]]:
    """``(M, b')``: a layer left at full rank, refitted to the original outputs from the compressed inputs
    (steps 1 and 3 only: same shape, no parameter added; ``falor_refit_kept``)."""
    mx, mt, ctt, cxt = stats.moments(centred=bias is not None)
    m = _ridge(weight, ctt, cxt, damping)
    return m, _exact_bias(weight, bias, mx, m @ mt)


def _set_weights(layer: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(layer.weight.shape).to(layer.weight.device, layer.weight.dtype))
        if bias is not None:
            layer.bias.copy_(bias.to(layer.bias.device, layer.bias.dtype))


def sequential_fit(original: nn.Module, model: nn.Module, ranks: dict[str, int], inputs: list[Any],
                   damping: float, replace, output_weights: Optional[dict[str, Pair]] = None,
                   refit: Iterable[str] = ()) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Fit every layer of ``ranks`` in forward order; ``replace(name, a, b, bias)`` puts each into ``model``
    before the next group is measured. ``original`` stays unchanged (the targets); returns the factors.
    ``output_weights``: per layer ``(R, R^-1)`` of :func:`output_weights.sqrt_pair` (``falor_weighting``).
    ``refit``: layers kept at full rank whose weights in ``model`` are refitted in place the same way
    (:func:`refit_full`), so they too absorb the error of the layers compressed before them."""
    output_weights = output_weights or {}
    refit = [n for n in refit if n not in ranks]
    factors = {}
    with evaluating(original, model):
        for group in forward_groups(original, list(ranks) + refit, inputs[0]):
            stats = _Cross()
            for x in inputs:
                stats.add(_input_rows(original, group[0], x), _input_rows(model, group[0], x))
            refitted = {}
            for name in group:
                layer = original.get_submodule(name)
                w = layer.weight.detach().reshape(layer.weight.shape[0], -1).to("cpu", torch.float64)
                if name in ranks:
                    factors[name] = fit_layer(w, layer.bias, stats, ranks[name], damping, output_weights.get(name))
                else:
                    refitted[name] = refit_full(w, layer.bias, stats, damping)
            for name in group:
                if name in ranks:
                    replace(name, *factors[name])
                else:
                    _set_weights(model.get_submodule(name), *refitted[name])
    return factors
