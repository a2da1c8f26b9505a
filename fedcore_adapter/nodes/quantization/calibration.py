"""Calibration data and the checks every quantization node runs before touching the model."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ...data import limited, split_batch, to_device
from ...errors import NodeError
from .backends import supported_engines


def check_engine(engine: str, label: str) -> None:
    available = supported_engines()
    if engine not in available:
        raise NodeError(label, f"backend {engine!r} is not available in this torch build; available: "
                               f"{', '.join(available)}")


def input_batches(loader: Any, limit: Optional[int]) -> list[Any]:
    """Model inputs (targets dropped) of up to ``limit`` batches, on the CPU."""
    if loader is None:
        return []
    return [split_batch(to_device(batch, "cpu"))[0] for batch in limited(loader, limit)]


def calibration_batches(ctx: Any, limit: Optional[int], label: str, purpose: str) -> list[Any]:
    """Validation batches (training batches when there are none) for ``purpose``; an error when both are empty."""
    batches = input_batches(ctx.val_loader, limit) or input_batches(ctx.train_loader, limit)
    if not batches:
        raise NodeError(label, f"{purpose} needs calibration data, but the data module's val_dataloader() and "
                               f"train_dataloader() yielded no batches")
    return batches


def input_spec(inputs: Any) -> list[dict]:
    """JSON description (shapes, dtypes) of example inputs, to rebuild stand-ins when replaying."""
    tensors = inputs if isinstance(inputs, tuple) else (inputs,)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError("example inputs must be a tensor or a tuple of tensors")
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in tensors]


def example_inputs(spec: list[dict]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in spec)
