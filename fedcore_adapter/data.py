"""Batches and model calls: one place that knows the accepted batch shapes.

A batch is ``(inputs, target)`` (``(*inputs, target)`` for several inputs), a
single tensor (unlabeled), a dict of tensors (Hugging Face style) with the
target under ``labels`` when supervised, or any object with ``.to(device)`` and
a length (ptls ``PaddedBatch``), alone (unlabeled) or as the inputs of a tuple.

A data module provides ``train_dataloader()``, ``val_dataloader()`` and optionally
``test_dataloader()`` as methods or instance attributes (ptls ``PtlsDataModule``
sets them with ``functools.partial``); :func:`provides` tells which it has.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .errors import ConfigError, DataError

LABEL_KEYS = ("labels", "label", "target", "targets")


def is_batch_object(obj: Any) -> bool:
    """True for a batch object that moves itself and has a length (ptls ``PaddedBatch``), not a tensor or container."""
    return (not isinstance(obj, (torch.Tensor, dict, list, tuple)) and callable(getattr(obj, "to", None))
            and hasattr(obj, "__len__"))


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` of a batch; ``target`` is None on unlabeled data."""
    if isinstance(batch, torch.Tensor) or is_batch_object(batch):
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
        f"unsupported batch type {type(batch).__name__}; expected a tensor, an (inputs, target) tuple, a dict of "
        f"tensors or an object with .to(device) and a length (ptls PaddedBatch)"
    )


def to_device(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if is_batch_object(obj):
        return obj.to(device)
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
    if is_batch_object(output) and isinstance(getattr(output, "payload", None), torch.Tensor):
        return output.payload  # a ptls PaddedBatch of per-event outputs
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
    """Samples in a batch's inputs: the first dimension of its first tensor, or the length of a batch object."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    if is_batch_object(inputs):
        return len(inputs)
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    for v in values:
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
        if is_batch_object(v):
            return len(v)
    raise DataError("cannot infer the batch size: the batch holds no tensor")


def _lightning_placeholder(fn: Any) -> bool:
    """True for LightningDataModule's default loader methods (they raise: the module did not define one)."""
    module = getattr(fn, "__module__", "") or ""
    return module.startswith(("lightning.", "pytorch_lightning.")) and "DataHooks" in getattr(fn, "__qualname__", "")


def loader_factory(dm: Any, name: str) -> Optional[Callable[[], Any]]:
    """``dm``'s ``name`` loader factory (``train_dataloader``...): a method or an instance attribute
    (ptls sets them with ``functools.partial``); None when absent or Lightning's unimplemented placeholder."""
    fn = vars(dm).get(name) if hasattr(dm, "__dict__") else None
    if not callable(fn):
        fn = getattr(dm, name, None)
    if not callable(fn) or _lightning_placeholder(getattr(fn, "__func__", fn)):
        return None
    return fn


def provides(dm: Any, name: str) -> bool:
    """True when ``dm.name()`` exists and is not Lightning's unimplemented placeholder."""
    return loader_factory(dm, name) is not None


def make_loader(dm: Any, name: str) -> Any:
    """``dm.name()``, or None when the data module does not provide it."""
    fn = loader_factory(dm, name)
    return fn() if fn is not None else None


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with Python, NumPy and torch (CPU) random generators seeded, then restore their states.

    Loaders that shuffle or crop at random (ptls split strategies draw from NumPy) give the same batches
    every time they are iterated inside it.
    """
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


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
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    return torch.device(name)
