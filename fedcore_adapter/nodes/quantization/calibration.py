"""The checks every quantization node runs before touching the model, and example inputs for replaying."""
from __future__ import annotations

from typing import Any

import torch

from ...errors import NodeError
from .backends import supported_engines


def check_engine(engine: str, label: str) -> None:
    available = supported_engines()
    if engine not in available:
        raise NodeError(label, f"backend {engine!r} is not available in this torch build; available: "
                               f"{', '.join(available)}")


def input_spec(inputs: Any) -> list[dict]:
    """JSON description (shapes, dtypes) of example inputs, to rebuild stand-ins when replaying."""
    tensors = inputs if isinstance(inputs, tuple) else (inputs,)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError("example inputs must be a tensor or a tuple of tensors")
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in tensors]


def example_inputs(spec: list[dict]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in spec)
