"""Modules compared by identity while torch-pruning builds its graph.

torch-pruning tests modules with ``==`` and ``in`` on lists. A module class that
overrides ``__eq__`` (a torchmetrics ``Metric`` returns a truthy metric for any
comparison) then matches every layer, and the whole model is silently left out
of the graph. :func:`identity_equality` gives such modules identity comparison
for the duration (same class name, same hash); :func:`plain_modules` keeps them
out of the module lists we hand to torch-pruning.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import nn

_PLAIN: dict[type, type] = {}


def has_custom_equality(module: nn.Module) -> bool:
    return type(module).__eq__ is not object.__eq__ or type(module).__ne__ is not object.__ne__


def _plain_class(cls: type) -> type:
    if cls not in _PLAIN:
        _PLAIN[cls] = type(cls.__name__, (cls,), {
            "__eq__": object.__eq__, "__ne__": object.__ne__, "__hash__": cls.__hash__,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _PLAIN[cls]


@contextmanager
def identity_equality(model: nn.Module) -> Iterator[None]:
    """Within the block, every sub-module of ``model`` with a custom ``__eq__`` compares by identity."""
    swapped = [(m, type(m)) for m in model.modules() if has_custom_equality(m)]
    for module, cls in swapped:
        module.__class__ = _plain_class(cls)
    try:
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def plain_modules(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """``modules`` and their sub-modules, without those with a custom ``__eq__`` (no prunable weights there)."""
    seen: set[int] = set()
    out = []
    for layer in modules:
        for m in layer.modules():
            if id(m) not in seen and not has_custom_equality(m):
                seen.add(id(m))
                out.append(m)
    return out
