"""What gets logged, as plain data: flattened params, numeric metrics, tags, versions (no mlflow import).

MLflow limits (3.x): keys of at most 250 characters from ``[A-Za-z0-9_-. /]``, param values
of at most 6000 characters.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
import subprocess
from importlib import metadata
from typing import Any, Iterable, Mapping, Optional

from ..results import DIFFERENCE_COLUMNS, RATIO_COLUMNS

MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 5000
VOLATILE_KEYS = {"resume", "debug"}  # differ between a run and its resume; not parameters of the result
VERSIONED = ("torch", "fedcore-adapter", "mlflow", "torch-pruning", "torchao", "transformers", "numpy")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def clean_key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY]


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings and lists of mappings become ``a.b.0.c`` keys; other lists are JSON values."""
    out: dict[str, str] = {}
    if isinstance(data, Mapping):
        items: Iterable = data.items()
    elif isinstance(data, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in data):
        items = enumerate(data)
    else:
        return {clean_key(prefix): _param_value(data)} if prefix else {}
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and not value:
            continue
        out.update(flatten(value, name))
    return out


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return text[:MAX_PARAM_VALUE]


def run_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The run's parameters: the flattened configuration (volatile keys left out) and package versions."""
    params = flatten({k: v for k, v in config.items() if k not in VOLATILE_KEYS})
    params.update({f"versions.{k}": v for k, v in package_versions().items()})
    return params


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def numeric_metrics(row: Mapping[str, Any], prefix: str = "", suffix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics row (bools, strings and None left out), under MLflow-safe keys."""
    out = {}
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "node_index":
            continue
        if math.isfinite(value):
            out[clean_key(f"{prefix}{key}{suffix}")] = float(value)
    return out


def ratios(first: Mapping[str, Any], last: Mapping[str, Any], keys: Iterable[str]) -> dict[str, float]:
    """``<key>_ratio`` = last / first for the keys both rows measured (the final model against the input)."""
    out = {}
    for key in keys:
        a, b = first.get(key), last.get(key)
        if _finite(a) and _finite(b) and a:
            out[f"{key}_ratio"] = float(b) / float(a)
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def headline(first: Mapping[str, Any], last: Mapping[str, Any]) -> dict[str, float]:
    """The final model against the input one, as a setup run's headline metrics.

    Ratios where a ratio means something (``params_ratio``, ``macs_ratio``, ``size_mb_ratio``,
    ``latency_ms_ratio``, ``throughput_sps_ratio``: final / input; ``compression_ratio``: input / final
    bytes, ``speedup``: input / final latency); differences for quality (``accuracy_delta_pt``: final -
    input accuracy in percentage points, ``loss_delta``).
    """
    out = ratios(first, last, RATIO_COLUMNS)
    for key, name in (("size_mb", "compression_ratio"), ("latency_ms", "speedup")):
        if _finite(first.get(key)) and _finite(last.get(key)) and last[key]:
            out[name] = float(first[key]) / float(last[key])
    for key, (suffix, scale) in DIFFERENCE_COLUMNS.items():
        if _finite(first.get(key)) and _finite(last.get(key)):
            out[f"{key}_delta{suffix}"] = (float(last[key]) - float(first[key])) * scale
    return out


def default_run_name(setup: str, model: Optional[str], seed: Any, config: Optional[Mapping[str, Any]] = None) -> str:
    """``RAW · mnist1d_cnn · seed=0`` and the setup's overrides (``nodes.0.epochs=1``) from ``config``."""
    config = config or {}
    overrides = flatten({"nodes": config.get("nodes") or {}, "common": {k: v for k, v in dict(
        config.get("common") or {}).items() if k != "seed"}})
    shown = {k: v for k, v in overrides.items() if not k.endswith(".progress")}  # display options differ no result
    parts = [setup, *([model] if model else []), f"seed={seed}"] + [f"{k}={v}" for k, v in shown.items()]
    return short(" \N{MIDDLE DOT} ".join(str(p) for p in parts), 250)


TEXT_COLUMNS = ("device", "dtype", "runtime", "batch_shape")  # metrics columns logged as tags (text, not numbers)


def text_tags(row: Mapping[str, Any], keys: Iterable[str] = TEXT_COLUMNS) -> dict[str, str]:
    return {f"fedcore.{k}": str(row[k]) for k in keys if row.get(k) is not None}


def short(text: Any, limit: int = MAX_TAG_VALUE) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def git_commit() -> Optional[str]:
    """The commit of the git checkout the run starts in (the working directory), if any."""
    return _git_commit(os.getcwd())


@functools.lru_cache(maxsize=16)
def _git_commit(cwd: str) -> Optional[str]:
    """Read-only ``git rev-parse HEAD`` in ``cwd``; cached per folder (a process may change directory)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
                             cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None


class StepCounter:
    """Per-key steps that never go back: a node that trains several times (pruning iterations with
    fine-tunes) restarts its epochs at 1; its curve continues after the last step instead."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._offset: dict[str, int] = {}

    def step(self, key: str, step: Optional[int]) -> int:
        last = self._last.get(key)
        if step is None:
            value = 1 if last is None else last + 1
        else:
            value = step + self._offset.get(key, 0)
            if last is not None and value <= last:
                self._offset[key] = last + 1 - step
                value = last + 1
        self._last[key] = value
        return value
