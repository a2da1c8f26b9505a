"""Node kinds: ``kind -> (config class, apply function)``.

A node family registers itself with :func:`register_node`::

    @register_node(PruningConfig)
    def apply_pruning(model, config, ctx): ...

Built-in families are imported lazily: their config classes are cheap
(pydantic only), their apply functions may pull heavy libraries, so both are
looked up only when a setup names their kind.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from .errors import ConfigError

# kind -> module that registers it on import (config classes and apply functions).
_BUILTIN_MODULES: dict[str, str] = {
    "training": "fedcore_adapter.nodes.training",
    "distillation": "fedcore_adapter.nodes.distillation",
    "pruning": "fedcore_adapter.nodes.pruning",
    "unstructured_pruning": "fedcore_adapter.nodes.pruning",
    "low_rank": "fedcore_adapter.nodes.low_rank",
    "ptq_dynamic": "fedcore_adapter.nodes.quantization",
    "ptq_static": "fedcore_adapter.nodes.quantization",
    "qat": "fedcore_adapter.nodes.quantization",
    "deploy": "fedcore_adapter.deploy.node",
}


@dataclass(frozen=True)
class NodeSpec:
    kind: str
    config_cls: type
    apply: Callable


_REGISTRY: dict[str, NodeSpec] = {}


def register_node(config_cls: type):
    """Decorator registering ``apply(model, config, ctx) -> nn.Module`` for ``config_cls.kind``."""
    kind = config_cls.model_fields["kind"].default

    def decorator(fn: Callable) -> Callable:
        _REGISTRY[kind] = NodeSpec(kind, config_cls, fn)
        return fn

    return decorator


def known_kinds() -> list[str]:
    return sorted(set(_BUILTIN_MODULES) | set(_REGISTRY))


def get_node(kind: str) -> NodeSpec:
    """The spec registered for ``kind``; imports the built-in family on first use."""
    if kind not in _REGISTRY and kind in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[kind])
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ConfigError(
            f"unknown node kind {kind!r}; registered kinds: {', '.join(known_kinds())}"
        ) from None
