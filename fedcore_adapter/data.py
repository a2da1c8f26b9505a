"""Batches and model calls: one place that knows the accepted batch shapes.

A batch is ``(inputs, target)`` (``(*inputs, target)`` for several inputs), a
single tensor (unlabeled), or a dict of tensors (Hugging Face style) with the
target under ``labels`` when supervised.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from .errors import DataError

LABEL_KEYS = ("labels", "label", "target", "targets")


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` of a batch; ``target`` is None on unlabeled data."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        target = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return inputs, target
    if isinstance(batch, (list, tuple)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
        return tuple(batch[:-1]), batch[-1]
    raise DataError(
        f"unsupported batch type {type(batch).__name__}; expected a tensor, an (inputs, target) tuple or a dict of tensors"
    )


def to_device(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Forward ``inputs`` as the batch shape implies: ``**dict``, ``*tuple`` or a single tensor."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def primary_output(output: Any) -> torch.Tensor:
    """The tensor a loss or comparison uses: logits, else the last hidden state, else the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DataError(f"cannot find a tensor in the model output of type {type(output).__name__}")


def batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    for v in values:
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
    raise DataError("cannot infer the batch size: the batch holds no tensor")


def limited(loader: Any, limit: int | None) -> Iterator[Any]:
    """Iterate ``loader``, stopping after ``limit`` batches when given."""
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            return
        yield batch


def first_batch(loader: Any, what: str = "data loader") -> Any:
    for batch in loader:
        return batch
    raise DataError(f"the {what} yielded no batches; check the data module's dataset is not empty")


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def has_quantized_weights(model: nn.Module) -> bool:
    """True when the model holds packed int8 weights (these run on CPU kernels)."""
    from torch.ao.nn.quantized.dynamic.modules.rnn import RNNBase as QuantizedRNN

    for module in model.modules():
        if isinstance(module, QuantizedRNN):
            return True
        weight = getattr(module, "weight", None)
        if callable(weight) and not isinstance(weight, nn.Parameter):
            try:
                if weight().is_quantized:
                    return True
            except Exception:  # noqa: BLE001 - not a packed-weight accessor
                continue
    return False


def runtime_device(model: nn.Module, preferred: torch.device) -> torch.device:
    """Where ``model`` can run: quantized models and deployed runtimes (CPU) run on the CPU whatever was preferred."""
    cpu_only = has_quantized_weights(model) or callable(getattr(model, "artifact_bytes", None))
    return torch.device("cpu") if cpu_only else preferred


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    return torch.device(name)
