"""Structural changes that a checkpoint replays on a freshly built model.

A node that changes a model's structure (removes channels, factorises layers,
converts to int8) records what it did with ``ctx.record_structure(name, data)``
where ``name`` was registered here with :func:`register_replay`. Loading a
checkpoint replays the recorded list, in order, on a fresh original model and
then loads the tensors, so no module is ever pickled.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

from .errors import FedcoreError

_REPLAYERS: dict[str, tuple[str, Callable[[nn.Module, Any], nn.Module]]] = {}


def register_replay(name: str):
    """Decorator: ``replay(model, data) -> model`` rebuilds the structure recorded as ``name``."""

    def decorator(fn: Callable[[nn.Module, Any], nn.Module]):
        _REPLAYERS[name] = (fn.__module__, fn)
        return fn

    return decorator


def transform_record(name: str, data: Any) -> dict[str, Any]:
    """The JSON record of one structural change (``data`` must be JSON-serialisable)."""
    if name not in _REPLAYERS:
        raise FedcoreError(f"structural change {name!r} has no registered replay; known: {sorted(_REPLAYERS)}")
    return {"transform": name, "module": _REPLAYERS[name][0], "data": data}


def replay(model: nn.Module, transforms: list[dict[str, Any]]) -> nn.Module:
    """Apply recorded structural changes to ``model`` in order."""
    for record in transforms:
        name, module = record["transform"], record.get("module", "")
        if name not in _REPLAYERS:
            if not module.startswith("fedcore_adapter."):
                raise FedcoreError(f"checkpoint names structural change {name!r} from untrusted module {module!r}")
            importlib.import_module(module)
        if name not in _REPLAYERS:
            raise FedcoreError(f"checkpoint needs structural change {name!r}, which no module registers")
        model = _REPLAYERS[name][1](model, record["data"])
    return model
