"""Selective precision: which layers are quantized, ``skip`` patterns, and the automatic mode
that keeps the most quantization-sensitive layers in float until an error budget is met."""
from __future__ import annotations

import copy
import fnmatch
import functools
import logging
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ...data import call_model, primary_output
from ...errors import NodeError
from ..toolkit import per_layer, write_report

log = logging.getLogger("fedcore_adapter")

# Exact types: subclasses (e.g. MultiheadAttention's out_proj) may not be called as plain layers; only kinds a
# node names in ``subclasses`` match subclasses too, and that node checks them (``embeddings.float_reason``).
LAYER_TYPES: dict[str, tuple[type, ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "embedding": (nn.Embedding, nn.EmbeddingBag),
    "recurrent": (nn.GRU, nn.LSTM),
}

# (model, names kept in float) -> quantized copy; must be picklable (module-level function or partial)
Quantizer = Callable[[nn.Module, frozenset], nn.Module]
# a layer -> why a node's int8 kernels cannot take it, or None when they can
FloatReason = Callable[[nn.Module], str | None]
SHOWN = 4  # layer names a metrics row's note lists; the rest are counted (all of them in KEPT_FLOAT_REPORT)
KEPT_FLOAT_REPORT = "kept_float.json"


def layer_kind(module: nn.Module, subclasses: Iterable[str] = ()) -> Optional[str]:
    return next((kind for kind, types in LAYER_TYPES.items()
                 if type(module) in types or (kind in subclasses and isinstance(module, types))), None)


def quantizable_layers(model: nn.Module, kinds: Iterable[str], subclasses: Iterable[str] = ()) -> dict[str, str]:
    """``{layer name: kind}`` of the layers of the given kinds, in model order (``subclasses``: kinds whose
    subclasses match too)."""
    kinds, subclasses = set(kinds), frozenset(subclasses)
    return {name: kind for name, module in model.named_modules()
            if (kind := layer_kind(module, subclasses)) is not None and kind in kinds}


def kept_float_text(reasons: dict[str, str], shown: int = SHOWN) -> str:
    """``{layer: why}`` as one bounded line: layers sharing a reason together, ``shown`` names at most, the rest
    counted: ``layers kept in float: a, b, c, d and 9 more (why); 2 more for other reasons (all in
    kept_float.json)``."""
    groups: dict[str, list[str]] = {}
    truncated = len(reasons) > shown
    for name, why in reasons.items():
        groups.setdefault(why, []).append(name)
    parts, hidden = [], 0
    for why, names in groups.items():
        if shown <= 0:
            hidden += len(names)
            continue
        more = len(names) - shown
        parts.append(", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "") + f" ({why})")
        shown -= len(names)
    text = "layers kept in float: " + "; ".join(parts) + (f"; {hidden} more for other reasons" if hidden else "")
    return text + (f" (all in {KEPT_FLOAT_REPORT})" if truncated else "")


def int8_capable(model: nn.Module, layers: dict[str, str], float_reason: dict[str, FloatReason], ctx: Any,
                 label: str) -> dict[str, str]:
    """``layers`` less those the node's int8 kernels cannot take (``float_reason[kind](layer)`` says why).

    No silent no-op: those stay float and are named, with why, in the node's metrics row (``note``, bounded by
    :func:`kept_float_text`), in one warning and in ``kept_float.json``; when no layer is left, a one-line error."""
    reasons = {n: why for n, k in layers.items()
               if k in float_reason and (why := float_reason[k](model.get_submodule(n))) is not None}
    if not reasons:
        return layers
    text = kept_float_text(reasons)
    left = {n: k for n, k in layers.items() if n not in reasons}
    if not left:
        raise NodeError(label, f"no layer can run in int8: {text}")
    log.warning("node %s: %s", label, text)
    ctx.note(text)
    write_report(ctx, KEPT_FLOAT_REPORT, reasons)
    return left


def require_layers(layers: dict[str, str], label: str, kinds: Iterable[str]) -> None:
    if not layers:
        types = ", ".join(t.__name__ for kind in kinds for t in LAYER_TYPES[kind])
        raise NodeError(label, f"the model has no quantizable layers ({types}); nothing would run in int8")


def skipped_by_patterns(layers: Iterable[str], patterns: list[str], label: str,
                        kept_float: Iterable[str] = ()) -> set[str]:
    """Layer names matching any ``skip`` pattern (fnmatch); a pattern matching nothing, or every layer, is an error
    (one matching only ``kept_float`` layers, those the node's kernels cannot take, is not: they stay float)."""
    layers, kept_float = list(layers), list(kept_float)
    skipped: set[str] = set()
    for pattern in patterns:
        hits = {name for name in layers if fnmatch.fnmatchcase(name, pattern)}
        if not hits and not any(fnmatch.fnmatchcase(name, pattern) for name in kept_float):
            shown = ", ".join(layers[:6]) + (", ..." if len(layers) > 6 else "")
            raise NodeError(label, f"skip pattern {pattern!r} matches no quantizable layer (layers: {shown})")
        skipped |= hits
    if layers and len(skipped) == len(layers):
        raise NodeError(label, f"skip patterns {patterns} match all {len(layers)} quantizable layers; "
                               f"nothing would be quantized")
    return skipped


def relative_error(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """``sum ||y_q - y||^2 / sum ||y||^2`` over batches."""
    num = sum(float((o.float() - r.float()).pow(2).sum()) for r, o in zip(reference, outputs))
    den = sum(float(r.float().pow(2).sum()) for r in reference)
    return num / max(den, 1e-30)


@torch.inference_mode()
def model_outputs(model: nn.Module, batches: list[Any]) -> list[torch.Tensor]:
    model.eval()
    return [primary_output(call_model(model, inputs)).detach().cpu() for inputs in batches]


def quantized_error(quantize: Quantizer, model: nn.Module, batches: list[Any], reference: list[torch.Tensor],
                    keep_float: frozenset) -> float:
    """Output error of ``quantize(copy of model, keep_float)`` against the float ``reference`` outputs."""
    quantized = quantize(copy.deepcopy(model), keep_float)
    return relative_error(reference, model_outputs(quantized, batches))


def _only_layer_error(quantize: Quantizer, model: nn.Module, batches: list[Any], reference: list[torch.Tensor],
                      layers: tuple[str, ...], layer: str) -> float:
    """Sensitivity of ``layer``: the output error when it is the only quantized layer."""
    return quantized_error(quantize, model, batches, reference, frozenset(layers) - {layer})


def sensitivities(ctx: Any, quantize: Quantizer, model: nn.Module, batches: list[Any], layers: list[str],
                  reference: list[torch.Tensor]) -> dict[str, float]:
    """Per-layer sensitivity, measured independently (``ctx.map``: on the cluster when distributed)."""
    fn = functools.partial(_only_layer_error, quantize, model, batches, reference, tuple(layers))
    return per_layer(ctx, fn, layers)


def choose_float_layers(ctx: Any, quantize: Quantizer, model: nn.Module, batches: list[Any], layers: list[str],
                        budget: float, max_float: Optional[int], fixed: set[str]) -> tuple[set[str], dict]:
    """The fewest most-sensitive layers to keep in float so the whole model's error is within ``budget``.

    Layers are ranked by sensitivity; the count ``k`` is found by bisection on the
    measured error of the whole model (each probe is one full quantization).
    Returns the float set (plus ``fixed``) and a JSON report of what was measured.
    """
    reference = model_outputs(model, batches)
    candidates = [name for name in layers if name not in fixed]
    sens = sensitivities(ctx, quantize, model, batches, candidates, reference)
    ranked = sorted(candidates, key=sens.get, reverse=True)
    limit = len(ranked) - 1  # at least one layer stays int8
    if max_float is not None:
        limit = min(limit, max_float)
    measured: dict[int, float] = {}

    def error_with(k: int) -> float:
        if k not in measured:
            measured[k] = quantized_error(quantize, model, batches, reference, frozenset(fixed | set(ranked[:k])))
        return measured[k]

    lo, hi = 0, limit
    if error_with(0) > budget:
        if error_with(hi) > budget:
            lo = hi  # budget unreachable within max_float_layers: keep as many as allowed
        else:
            while hi - lo > 1:  # invariant: error(lo) > budget >= error(hi)
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if error_with(mid) <= budget else (mid, hi)
            lo = hi
    chosen = lo
    report = {
        "error_budget": budget,
        "sensitivity": {name: sens[name] for name in ranked},
        "probes": {str(k): v for k, v in sorted(measured.items())},
        "kept_float": ranked[:chosen],
        "error": measured[chosen],
        "budget_met": measured[chosen] <= budget,
    }
    return fixed | set(ranked[:chosen]), report
