"""Runtimes by name and artifacts by path: the missing-extra check, ``deploy.json``, :func:`load_artifact`."""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Optional

from torch import nn

from ..errors import ConfigError
from ..results import write_json
from .extras import require_extra

INFO_FILE = "deploy.json"
# artifact suffix -> runtime module; runtime name -> module
SUFFIXES = {".onnx": "onnxruntime", ".xml": "openvino", ".pt2": "torch_compile"}


def runtime_module(runtime: str) -> ModuleType:
    """The module of ``runtime`` after checking its extra is installed."""
    require_extra(runtime)
    return importlib.import_module(f"{__package__}.{runtime}")


def write_info(folder: Path, info: dict) -> None:
    write_json(folder / INFO_FILE, info)


def load_artifact(path: str | Path, threads: Optional[int] = None, reference: Optional[nn.Module] = None) -> nn.Module:
    """A runner for an exported artifact: ``model.onnx``, ``model.xml`` (+ ``.bin``), ``model.pt2``,
    or a node / results folder holding one (its ``deploy.json`` says which)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "final" if (path / "final" / INFO_FILE).exists() else path
        info_path = folder / INFO_FILE
        if not info_path.exists():
            raise ConfigError(f"{path} holds no exported model ({INFO_FILE} is missing); give model.onnx, "
                              f"model.xml or model.pt2, or the folder of a deploy node")
        path = folder / json.loads(info_path.read_text())["artifact"]
    runtime = SUFFIXES.get(path.suffix)
    if runtime is None:
        raise ConfigError(f"{path}: not an exported model; expected a path ending in "
                          f"{', '.join(SUFFIXES)} (or the folder of a deploy node)")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    info_path = path.parent / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return runtime_module(runtime).load(path, threads or info.get("threads"), reference,
                                        info.get("weight_dtype", "unknown"))
