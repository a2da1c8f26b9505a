"""Pruning history: which indices each module lost, in order, replayable on a freshly built model.

A record is JSON::

    {"ops": [{"module": "features.0", "side": "out", "dim": -1, "idxs": [3, 7]}, ...],
     "attributes": {"encoder.layer.0.attention.self": {"num_attention_heads": 6, "all_head_size": 192}}}

Each op calls torch-pruning's per-layer pruning function (``prune_out_channels`` /
``prune_in_channels`` of the module's type) exactly as the pruning did, so the
replay needs no tracing and works on whatever structure earlier records rebuilt
(e.g. low-rank factor layers). ``attributes`` are set afterwards (head counts).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ...errors import FedcoreError
from ...structure import register_replay
from .layer_pruners import pruner_for

REPLAY_NAME = "pruning"


class History:
    """The ops of one pruning node, in the order they were applied."""

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []
        self.attributes: dict[str, dict[str, Any]] = {}

    def add(self, module: str, side: str, idxs, dim: int = -1) -> None:
        self.ops.append({"module": module, "side": side, "dim": int(dim), "idxs": sorted(int(i) for i in idxs)})

    def set_attributes(self, module: str, **values: Any) -> None:
        self.attributes.setdefault(module, {}).update(values)

    def to_json(self) -> dict[str, Any]:
        return {"ops": self.ops, "attributes": self.attributes}

    def __bool__(self) -> bool:
        return bool(self.ops or self.attributes)


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str, Any]:
    """``(parent, attribute, object)`` for a dotted module or parameter name."""
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        parent = None
    target = getattr(parent, attr, None) if parent is not None else None
    if target is None:
        raise FedcoreError(f"pruning history names {name!r}, which the rebuilt model does not have; "
                           f"load the checkpoint onto the same original model it was made from")
    return parent, attr, target


def apply_op(model: nn.Module, op: dict[str, Any]) -> None:
    """Remove ``op['idxs']`` from one module (or unwrapped parameter) with torch-pruning's layer function."""
    from torch_pruning.pruner import function as tp_function

    parent, attr, target = _resolve(model, op["module"])
    if isinstance(target, nn.Parameter):
        pruner = tp_function.ParameterPruner(pruning_dim=op["dim"])
        setattr(parent, attr, pruner.prune_out_channels(target, op["idxs"]))
        return
    pruner = pruner_for(target)
    if pruner is None:
        raise FedcoreError(f"pruning history: no torch-pruning function for {type(target).__name__} {op['module']!r}")
    pruner.pruning_dim = op["dim"]
    getattr(pruner, f"prune_{op['side']}_channels")(target, op["idxs"])


@register_replay(REPLAY_NAME)
def replay_pruning(model: nn.Module, data: dict[str, Any]) -> nn.Module:
    """Redo a pruning node's removals on ``model`` (the structure it had when that node ran)."""
    for op in data["ops"]:
        apply_op(model, op)
    for name, values in data.get("attributes", {}).items():
        module = model.get_submodule(name)
        for key, value in values.items():
            setattr(module, key, value)
    return model
