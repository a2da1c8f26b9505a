"""The tail every int8 node ends with: the ``auto_skip`` float layers (measured, reported, logged) and the
optional ``export`` of the quantized model."""
from __future__ import annotations

from typing import Any, Iterable, Optional

from torch import nn

from ..toolkit import write_report
from .export import export_program
from .selective import Quantizer, choose_float_layers


def auto_skip_layers(ctx: Any, auto_skip: Any, quantize: Quantizer, model: nn.Module, batches: list[Any],
                     layers: Iterable[str], keep_float: set[str], log: bool = True) -> set[str]:
    """``keep_float`` plus the layers ``auto_skip`` (an AutoSkip config, or None: nothing added) keeps in float;
    writes ``sensitivity.json`` and, with ``log``, logs ``quant_error`` and ``quant_float_layers``."""
    if auto_skip is None:
        return keep_float
    keep_float, report = choose_float_layers(ctx, quantize, model, batches[:auto_skip.batches], list(layers),
                                             auto_skip.error_budget, auto_skip.max_float_layers, keep_float)
    write_report(ctx, "sensitivity.json", report)
    if log:
        ctx.log({"quant_error": report["error"], "quant_float_layers": float(len(report["kept_float"]))})
    return keep_float


def export_if_asked(quantized: nn.Module, config: Any, batches: Optional[list[Any]], ctx: Any, label: str) -> None:
    """With ``config.export``: the quantized model exported beside its checkpoint (see :mod:`.export`)."""
    if config.export:
        export_program(quantized, batches, ctx, label)
