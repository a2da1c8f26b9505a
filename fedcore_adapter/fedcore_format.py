"""Conversion from the FedCore setup dict format to the native Setup mapping.

FedCore format::

    {'compression_task': 'composite_compression', 'need_pretrain': False,
     'common': {'save_each': -1},
     'model_params': {'training_model': {'epochs': 10}, 'pruning_model': {...}},
     'initial_assumption': ['training_model', 'pruning_model']}

Each node name maps onto a kind; its parameters are passed through unchanged
(node configs accept FedCore's parameter names themselves).
"""
from __future__ import annotations

import warnings
from typing import Any

from .errors import ConfigError
from .registry import get_node

FEDCORE_NODE_KINDS: dict[str, str] = {
    "training_model": "training",
    "pruning_model": "pruning",
    "low_rank_model": "low_rank",
    "post_training_quant": "ptq_static",
    "post_dynamic_quant": "ptq_dynamic",
    "training_aware_quant": "qat",
    "distilation_model": "distillation",
    "distillation_model": "distillation",
}
KIND_TO_FEDCORE_NAME: dict[str, str] = {
    kind: name for name, kind in FEDCORE_NODE_KINDS.items() if name != "distillation_model"
}

# FedCore `common` keys and their native CommonConfig names.
_COMMON_KEYS = {
    "save_each": "save_each",
    "batch_limit": "limit_train_batches",
    "calib_batch_limit": "limit_valid_batches",
    "device": "device",
    "seed": "seed",
    "distributed_compression": "distributed_compression",
}
_FEDCORE_TOP_KEYS = {"compression_task", "need_pretrain", "common", "model_params", "initial_assumption"}


def is_fedcore_format(data: dict) -> bool:
    return bool(_FEDCORE_TOP_KEYS & {"compression_task", "model_params", "initial_assumption"} & set(data))


def native_setup(data: dict, name: str | None = None) -> dict[str, Any]:
    """The native setup mapping of ``data`` in either format (the one place the format is told apart);
    ``name`` names it unless a native mapping has its own."""
    if is_fedcore_format(data):
        return from_fedcore(data, name=name)
    return {**data, "name": name} if name and "name" not in data else data


def from_fedcore(data: dict, name: str | None = None) -> dict[str, Any]:
    """Native setup mapping from a FedCore-format dict; one-line ConfigError on bad input."""
    unknown = set(data) - _FEDCORE_TOP_KEYS - {"name", "description"}
    if unknown:
        raise ConfigError(
            f"FedCore setup: unknown key(s) {sorted(unknown)}; allowed: {sorted(_FEDCORE_TOP_KEYS)}"
        )
    task = data.get("compression_task", "composite_compression")
    if task != "composite_compression":
        raise ConfigError(f"FedCore setup: compression_task={task!r} is not supported; "
                          f"allowed: 'composite_compression'")
    if "initial_assumption" not in data:
        raise ConfigError("FedCore setup: missing 'initial_assumption' (the ordered list of node names)")
    chain = data["initial_assumption"]
    if isinstance(chain, str):
        chain = [chain]
    if not isinstance(chain, (list, tuple)) or not chain:
        raise ConfigError(f"FedCore setup: 'initial_assumption' must be a non-empty list of node names (got {chain!r})")
    params = data.get("model_params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"FedCore setup: 'model_params' must be a mapping of node name -> parameters "
                          f"(got {params!r})")

    nodes = []
    for i, node_name in enumerate(chain):
        if node_name not in FEDCORE_NODE_KINDS:
            raise ConfigError(
                f"FedCore setup: initial_assumption[{i}] = {node_name!r} is not a FedCore node; "
                f"known: {', '.join(sorted(FEDCORE_NODE_KINDS))}"
            )
        node_params = dict(params.get(node_name) or {})
        nodes.append({"kind": FEDCORE_NODE_KINDS[node_name], **node_params})

    common: dict[str, Any] = {}
    dropped = []
    for key, value in (data.get("common") or {}).items():
        if key in _COMMON_KEYS:
            common[_COMMON_KEYS[key]] = value
        else:
            dropped.append(key)
    if dropped:
        warnings.warn(f"FedCore setup: common option(s) {sorted(dropped)} have no meaning here and are ignored",
                      stacklevel=2)
    if data.get("need_pretrain"):
        warnings.warn("FedCore setup: need_pretrain=True is ignored; put a 'training_model' first in the chain",
                      stacklevel=2)
    out: dict[str, Any] = {"common": common, "nodes": nodes}
    if name or data.get("name"):
        out["name"] = name or data["name"]
    if data.get("description"):
        out["description"] = data["description"]
    return out


def _fedcore_params(kind: str, params: dict) -> dict:
    """A node's parameters under FedCore's names, where its config class says how (``to_fedcore``)."""
    try:
        convert = getattr(get_node(kind).config_cls, "to_fedcore", None)
    except ConfigError:
        return params
    return convert(params) if convert is not None else params


def to_fedcore(setup_dict: dict) -> dict[str, Any]:
    """FedCore-format dict of a native setup mapping (node parameters of the last node of each kind win)."""
    common_back = {v: k for k, v in _COMMON_KEYS.items()}
    model_params: dict[str, Any] = {}
    chain = []
    for node in setup_dict["nodes"]:
        node = dict(node)
        kind = node.pop("kind")
        node.pop("name", None)
        fed_name = KIND_TO_FEDCORE_NAME.get(kind, kind)
        chain.append(fed_name)
        model_params[fed_name] = _fedcore_params(kind, node)
    common = {common_back[k]: v for k, v in setup_dict.get("common", {}).items() if k in common_back}
    return {
        "compression_task": "composite_compression",
        "need_pretrain": False,
        "common": common,
        "model_params": model_params,
        "initial_assumption": chain,
    }
