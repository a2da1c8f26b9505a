"""decompose_config: the JSON structure of every factorised layer, and rebuilding it on a fresh model.

Written by the node as ``decompose_config.json`` beside its checkpoint (as
ptdeco's ``decompose_config`` and AMCT's decomposition info file) and
recorded as the ``low_rank`` structural change, so ``load_model`` and the
offline flow use the same function::

    {"format": "fedcore_adapter.decompose_config/1", "method": "svd",
     "layers": {"classifier.1": {"original": {"type": "Linear", ...},
                                 "decomposed": {"type": "FactorizedLayer", "first": {...}, "second": {...}},
                                 "rank": 24, "meta": {"energy_kept": 0.91, ...}}},
     "meta": {...}}

Offline flow: decompose in one script, then elsewhere::

    model = build_original_model()
    fedcore_adapter.apply_decompose_config(model, "decompose_config.json")
    model.load_state_dict(torch.load("state.pt", weights_only=True))

Only the structure at decomposition time is rebuilt: a later node (pruning)
that narrows these layers replays its own change afterwards. Layers refitted at
full rank (``falor_refit_kept``, listed under ``meta.refit_kept``) keep their
structure: their new weights are in the state dict.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ...errors import FedcoreError
from ...structure import register_replay
from .layers import build_module, module_config

FORMAT = "fedcore_adapter.decompose_config/1"
FILE_NAME = "decompose_config.json"


def new_config(method: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"format": FORMAT, "method": method, "layers": {}, "meta": meta or {}}


def describe(original: nn.Module, decomposed: nn.Module, rank: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The record of one replaced layer."""
    return {"original": module_config(original), "decomposed": module_config(decomposed), "rank": int(rank),
            "meta": meta}


def _load(config: Any) -> dict[str, Any]:
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / FILE_NAME
        if not path.is_file():
            raise FedcoreError(f"decompose_config file {str(path)!r} does not exist")
        config = json.loads(path.read_text())
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("layers"), dict):
        raise FedcoreError(f"not a decompose_config: expected a mapping with format {FORMAT!r} and 'layers'")
    return config


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_decompose_config(model: nn.Module, config: Any) -> nn.Module:
    """Rebuild the factorised structure described by ``config`` (a mapping, a JSON file or its folder)
    on ``model`` in place and return it; then load the decomposed state dict into it.

    Every layer is checked to be the one the config was made from (type and shapes), and every new
    layer is built, before any is replaced: a config that does not fit leaves ``model`` as it was.
    """
    config = _load(config)
    modules = dict(model.named_modules())
    replacements = []
    for name, record in config["layers"].items():
        if name not in modules:
            raise FedcoreError(f"decompose_config names layer {name!r}, which this model does not have; "
                               f"build the model the config was made from")
        if not isinstance(record, dict) or not {"original", "decomposed"} <= set(record):
            raise FedcoreError(f"decompose_config: the record of layer {name!r} needs 'original' and 'decomposed'")
        current = modules[name]
        try:
            found = module_config(current)
        except TypeError:
            found = {"type": type(current).__name__}
        if found != record["original"]:
            raise FedcoreError(f"decompose_config: layer {name!r} is {found} here but the config was made from "
                               f"{record['original']}; build the model the config was made from")
        try:
            new = build_module(record["decomposed"])
        except (KeyError, TypeError, ValueError) as err:
            raise FedcoreError(f"decompose_config: cannot build the decomposed layer {name!r}: {err}") from None
        reference = next(current.parameters(), None)
        if reference is not None:
            new = new.to(reference.device, reference.dtype)
        replacements.append((name, new))
    for name, new in replacements:
        _replace(model, name, new)
    return model


@register_replay("low_rank")
def _replay(model: nn.Module, data: Any) -> nn.Module:
    return apply_decompose_config(model, data)
