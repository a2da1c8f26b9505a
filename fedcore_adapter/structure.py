"""Structural changes that a checkpoint replays on a freshly built model.

A node that changes a model's structure (removes channels, factorises layers,
converts to int8) records what it did with ``ctx.record_structure(name, data)``
where ``name`` was registered here with :func:`register_replay`. Loading a
checkpoint replays the recorded list, in order, on a fresh original model and
then loads the tensors, so no module is ever pickled.

A manifest names its changes only; the code that replays them comes from this
registry, never from the file: the built-in names map to modules of this package
(listed below, imported on first use), and a change of the user's own must be
registered (its module imported by the user) before loading. Manifests written
before this rule also carry a ``module`` field; it is ignored.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

from .errors import FedcoreError

# Built-in change name -> the package module that registers it (imported on first use, by code, not by files).
_BUILTIN_MODULES: dict[str, str] = {
    "pruning": "fedcore_adapter.nodes.pruning.history",
    "quantize": "fedcore_adapter.nodes.quantization.replay",
    "low_rank": "fedcore_adapter.nodes.low_rank.decompose_config",
}
_REPLAYERS: dict[str, Callable[[nn.Module, Any], nn.Module]] = {}


def register_replay(name: str):
    """Decorator: ``replay(model, data) -> model`` rebuilds the structure recorded as ``name``."""

    def decorator(fn: Callable[[nn.Module, Any], nn.Module]):
        _REPLAYERS[name] = fn
        return fn

    return decorator


def known_changes() -> list[str]:
    return sorted(set(_BUILTIN_MODULES) | set(_REPLAYERS))


def _replayer(name: Any) -> Callable[[nn.Module, Any], nn.Module]:
    if isinstance(name, str) and name not in _REPLAYERS and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if not isinstance(name, str) or name not in _REPLAYERS:
        raise FedcoreError(f"the checkpoint names structural change {name!r}, which is not registered "
                           f"(known: {', '.join(known_changes())}); a change of your own must be registered with "
                           f"fedcore_adapter.structure.register_replay before the checkpoint is loaded")
    return _REPLAYERS[name]


def transform_record(name: str, data: Any) -> dict[str, Any]:
    """The JSON record of one structural change (``data`` must be JSON-serialisable)."""
    if name not in _REPLAYERS:
        raise FedcoreError(f"structural change {name!r} has no registered replay; known: {known_changes()}")
    return {"transform": name, "data": data}


def replay(model: nn.Module, transforms: list[dict[str, Any]]) -> nn.Module:
    """Apply recorded structural changes to ``model`` in order (every name is checked before any is applied)."""
    if not isinstance(transforms, list) or not all(isinstance(r, dict) and "transform" in r for r in transforms):
        raise FedcoreError("the checkpoint's manifest has malformed 'transforms' (expected a list of "
                           "{\"transform\": name, \"data\": ...} records)")
    steps = [(_replayer(record["transform"]), record.get("data")) for record in transforms]
    for fn, data in steps:
        model = fn(model, data)
    return model
