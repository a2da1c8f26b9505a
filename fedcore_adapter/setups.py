"""Named setups (``setups/*.yaml``), setup files, and overrides of their fields (``building.resolve_setup``
turns them into a validated Setup)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from .errors import ConfigError
from .resources import setups_dir


def named_setups() -> dict[str, Path]:
    """Canonical (upper-case) setup name -> its YAML file."""
    return {p.stem.upper(): p for p in sorted(setups_dir().glob("*.yaml"))}


def read_setup_file(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"setup file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"setup file {str(path)!r} is not valid {path.suffix[1:].upper() or 'YAML'}: "
                          f"{str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"setup file {str(path)!r} must hold a mapping (got {type(data).__name__})")
    return data


def setup_source(spec: str | Path) -> tuple[dict, str]:
    """``(raw mapping, name)`` of a named setup (case-insensitive) or a setup file (name = file stem)."""
    known = named_setups()
    key = str(spec).upper()
    if key in known:
        data = read_setup_file(known[key])
        return data, data.get("name", key)
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists() or "/" in str(spec):
        data = read_setup_file(path)
        return data, path.stem
    raise ConfigError(f"unknown setup {str(spec)!r}; named setups: {', '.join(known)} (case-insensitive), "
                      f"or a path to a .yaml/.json setup file")


def _deep_update(target: dict, fields: Mapping[str, Any]) -> None:
    """``target.update(fields)``, merging nested mappings (``finetune_params.learning_rate`` keeps the epochs)."""
    for key, value in fields.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def apply_overrides(data: dict, overrides: Optional[Mapping[str, Any]]) -> dict:
    """Apply ``{'common': {...}, 'nodes': {<index or kind>: {...}}}`` to a native setup mapping."""
    if not overrides:
        return data
    data = copy.deepcopy(data)
    unknown = set(overrides) - {"common", "nodes", "name", "description"}
    if unknown:
        raise ConfigError(f"unknown setup override key(s) {sorted(unknown)}; allowed: common, nodes, name, description")
    data["nodes"] = [copy.deepcopy(n) for n in data.get("nodes", [])]  # YAML anchors must not share one dict
    data.setdefault("common", {}).update(dict(overrides.get("common") or {}))
    for key in ("name", "description"):
        if overrides.get(key) is not None:
            data[key] = overrides[key]
    nodes = data.get("nodes", [])
    for target, fields in (overrides.get("nodes") or {}).items():
        fields = dict(fields)
        if isinstance(target, int) or str(target).lstrip("-").isdigit():
            i = int(target)
            if not -len(nodes) <= i < len(nodes):
                count = f"{len(nodes)} node" + ("s" if len(nodes) != 1 else "")
                raise ConfigError(f"override nodes.{target}: the setup has {count} (indices 0..{len(nodes) - 1})")
            _deep_update(nodes[i], fields)
        else:
            matched = [n for n in nodes if n.get("kind") == target]
            if not matched:
                kinds = sorted({n.get("kind") for n in nodes})
                raise ConfigError(f"override nodes.{target}: no node of that kind in the setup; "
                                  f"its kinds: {', '.join(kinds)}")
            for n in matched:
                _deep_update(n, fields)
    return data
