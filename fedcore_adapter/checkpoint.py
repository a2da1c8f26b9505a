"""Checkpoints without pickled modules: tensors + a JSON manifest.

A checkpoint folder holds ``state.pt`` (the state dict, loaded with
``weights_only=True``) and ``manifest.json`` (format, the ordered structural
changes since the original model, and free-form node metadata). Loading
replays the changes on a freshly built original model, then loads the tensors.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import FedcoreError
from .structure import replay

FORMAT = "fedcore_adapter.checkpoint/1"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def save_checkpoint(model: nn.Module, directory: Path | str, transforms: list[dict], meta: Optional[dict] = None,
                    state_dict: Optional[dict] = None) -> Path:
    """Write ``directory`` atomically; ``state_dict`` overrides the model's (e.g. sparse tensors)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state_dict if state_dict is not None else model.state_dict(), tmp / STATE_FILE)
    manifest = {
        "format": FORMAT,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "torch_version": torch.__version__,
        "transforms": transforms,
        "meta": meta or {},
    }
    write_json(tmp / MANIFEST_FILE, manifest)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def read_manifest(directory: Path | str) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FedcoreError(f"{directory} is not a checkpoint: {MANIFEST_FILE} is missing")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise FedcoreError(f"{path}: unknown checkpoint format {manifest.get('format')!r}; expected {FORMAT!r}")
    return manifest


def checkpoint_bytes(directory: Path | str) -> int:
    return (Path(directory) / STATE_FILE).stat().st_size


def load_state(directory: Path | str, map_location: str | torch.device = "cpu") -> dict:
    """The saved tensors (sparse ones made dense), loaded with ``weights_only=True``."""
    state = torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=True)
    return {k: (v.to_dense() if isinstance(v, torch.Tensor) and v.is_sparse else v) for k, v in state.items()}


def load_model(checkpoint_dir: Path | str, base_model: nn.Module, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a compressed model on a freshly built original ``base_model`` and load its weights.

    ``checkpoint_dir`` is a node folder (``nodes/<i>_<kind>``), a run's ``final``
    folder, or a results folder (its ``final`` is used).
    """
    directory = Path(checkpoint_dir)
    if not (directory / MANIFEST_FILE).exists() and (directory / "final" / MANIFEST_FILE).exists():
        directory = directory / "final"
    manifest = read_manifest(directory)
    model = replay(base_model, manifest["transforms"])
    model.load_state_dict(load_state(directory, map_location), strict=True)
    return model.eval()


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` (hard links where the filesystem allows)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for item in src.iterdir():
        try:
            os.link(item, dst / item.name)
        except OSError:
            shutil.copy2(item, dst / item.name)
