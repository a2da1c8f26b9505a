"""Tensors inside batches and layer outputs while tracing, ptls ``PaddedBatch`` included.

ptls layers take and return a ``PaddedBatch`` (a ``payload`` tensor or dict of tensors
plus ``seq_lens``), which torch's pytree does not open. These helpers look inside it so
tracing links such layers like any other.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ...data import primary_output


def is_padded(obj: Any) -> bool:
    """A ptls ``PaddedBatch``-like object: a ``payload`` and ``seq_lens``."""
    return hasattr(obj, "payload") and hasattr(obj, "seq_lens") and not isinstance(obj, torch.Tensor)


def _leaves(obj: Any) -> Iterator[Any]:
    for leaf in tree_flatten(obj)[0]:
        if is_padded(leaf):
            yield from _leaves(leaf.payload)
        else:
            yield leaf


def floating_tensors(obj: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in ``obj`` (nested containers and PaddedBatch payloads), in order."""
    return [t for t in _leaves(obj) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def with_tensors(obj: Any, tensors: tuple[torch.Tensor, ...]) -> Any:
    """``obj`` rebuilt with its floating-point tensors replaced by ``tensors`` (same order)."""
    replacements = iter(tensors)

    def rebuild(value: Any) -> Any:
        leaves, spec = tree_flatten(value)
        out = []
        for leaf in leaves:
            if is_padded(leaf):
                out.append(type(leaf)(rebuild(leaf.payload), leaf.seq_lens))
            elif isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                out.append(next(replacements))
            else:
                out.append(leaf)
        return tree_unflatten(out, spec)

    return rebuild(obj)


def traced_output(output: Any) -> torch.Tensor:
    """The output tensor tracing starts from (a PaddedBatch's payload for sequence outputs)."""
    return primary_output(output.payload if is_padded(output) else output)


def padded_slice(batch: Any, n: int) -> Any:
    """The first ``n`` sequences of a PaddedBatch."""
    payload = batch.payload
    payload = {k: v[:n] for k, v in payload.items()} if isinstance(payload, dict) else payload[:n]
    return type(batch)(payload, batch.seq_lens[:n])


_TRACEABLE: dict[type, type] = {}


def traceable(batch: Any) -> Any:
    """``batch`` (a PaddedBatch) given a ``grad_fn``: its first floating tensor's, which torch-pruning's
    hooks read from every traced layer's output."""
    cls = type(batch)
    if cls not in _TRACEABLE.values():
        if cls not in _TRACEABLE:
            _TRACEABLE[cls] = type(cls.__name__, (cls,), {
                "grad_fn": property(lambda self: next(iter(floating_tensors(self.payload)), None).grad_fn),
                "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        batch.__class__ = _TRACEABLE[cls]
    return batch
