"""Checkpoints without pickled modules: tensors + a JSON manifest.

A checkpoint folder holds ``state.pt`` (the state dict, loaded with
``weights_only=True``) and ``manifest.json`` (format, the ordered structural
changes since the original model, and free-form node metadata). Loading
replays the changes on a freshly built original model, then loads the tensors.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import FedcoreError
from .results import write_json
from .structure import replay

FORMAT = "fedcore_adapter.checkpoint/1"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
TRANSFORMS_ATTR = "_fedcore_transforms"


def applied_transforms(model: nn.Module) -> list[dict]:
    """The structural changes that made ``model`` from its original (empty for an original model).

    ``load_model`` and the engine keep this on the model, so that a run starting from a compressed
    model (``pretrained=``) writes checkpoints that rebuild from the original model.
    """
    return list(getattr(model, TRANSFORMS_ATTR, []))


def mark_transforms(model: nn.Module, transforms: list[dict]) -> nn.Module:
    object.__setattr__(model, TRANSFORMS_ATTR, list(transforms))
    return model


def _sparse_csr(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` (viewed as rows x columns) as CSR with int32 indices, when that takes fewer bytes; else None."""
    if t.dim() < 2 or not t.is_floating_point() or t.numel() >= 2**31:
        return None
    flat = t.detach().reshape(t.shape[0], -1)
    nnz = int((flat != 0).sum())
    if nnz * (t.element_size() + 4) + (flat.shape[0] + 1) * 4 >= t.numel() * t.element_size():
        return None
    csr = flat.to_sparse_csr()
    return torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), size=flat.shape)


def save_checkpoint(model: nn.Module, directory: Path | str, transforms: list[dict], meta: Optional[dict] = None,
                    state_dict: Optional[dict] = None, sparse: bool = False) -> Path:
    """Write ``directory`` atomically; ``state_dict`` overrides the model's; ``sparse`` stores weights
    as CSR tensors where that saves bytes (their dense shapes go in the manifest)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    source = state_dict if state_dict is not None else model.state_dict()
    state = OrderedDict(source)
    state._metadata = getattr(source, "_metadata", OrderedDict())  # module versions: quantized modules read them
    sparse_shapes = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*[Ss]parse")  # "sparse CSR support is in beta"
        for key, value in state.items() if sparse else ():
            csr = _sparse_csr(value) if isinstance(value, torch.Tensor) else None
            if csr is not None:
                state[key], sparse_shapes[key] = csr, list(value.shape)
        torch.save(state, tmp / STATE_FILE)
    manifest = {
        "format": FORMAT,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "torch_version": torch.__version__,
        "transforms": transforms,
        "meta": meta or {},
        **({"sparse_shapes": sparse_shapes} if sparse_shapes else {}),
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


def load_tensors(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file holding pickled objects is refused in one line that says
    how to make a safe one (never torch's hint to load it unsafely)."""
    import pickle

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*[Ss]parse")  # "sparse CSR support is in beta"
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)|Unsupported operand \d+|(invalid load key, [^.]*)",
                          str(err))
        what = f" (it needs {found.group(1)})" if found and found.group(1) else ""
        raise FedcoreError(f"{path} is not a safe checkpoint: it holds pickled Python objects{what}, which are never "
                           f"loaded; save tensors only, e.g. torch.save(model.state_dict(), path), or pass a "
                           f"checkpoint or results folder written by fedcore_adapter") from None
    except RuntimeError as err:
        if "PytorchStreamReader" in str(err) or "zip archive" in str(err):
            raise FedcoreError(f"{path} is not a torch checkpoint (torch.load cannot read it); pass a state-dict "
                               f"file written by torch.save or a fedcore_adapter checkpoint folder") from None
        raise


def load_state(directory: Path | str, map_location: str | torch.device = "cpu") -> dict:
    """The saved tensors (sparse ones made dense, in their recorded shapes), loaded with ``weights_only=True``."""
    state = load_tensors(Path(directory) / STATE_FILE, map_location)
    manifest_path = Path(directory) / MANIFEST_FILE
    shapes = json.loads(manifest_path.read_text()).get("sparse_shapes", {}) if manifest_path.is_file() else {}
    out: dict = OrderedDict()
    out._metadata = getattr(state, "_metadata", OrderedDict())  # module versions: quantized modules read them
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.layout != torch.strided:
            v = v.to_dense().reshape(shapes.get(k, v.shape))
        out[k] = v
    return out


def load_model(checkpoint_dir: Path | str, base_model: nn.Module,
               map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a compressed model on a freshly built original ``base_model`` and load its weights.

    ``checkpoint_dir`` is a node folder (``nodes/<i>_<kind>``), a run's ``final``
    folder, or a results folder (its ``final`` is used).
    """
    directory = Path(checkpoint_dir)
    if not (directory / MANIFEST_FILE).exists() and (directory / "final" / MANIFEST_FILE).exists():
        directory = directory / "final"
    manifest = read_manifest(directory)
    transforms, done = manifest["transforms"], applied_transforms(base_model)
    if transforms[:len(done)] != done:
        raise FedcoreError(f"{directory}: the checkpoint was not made from this model (its structure has "
                           f"{len(done)} changes the checkpoint's history does not start with); "
                           f"pass a freshly built original model")
    model = replay(base_model, transforms[len(done):])
    model.load_state_dict(load_state(directory, map_location), strict=True)
    return mark_transforms(model, transforms).eval()


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` (hard links where the filesystem allows)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_dir():  # e.g. a deploy node's model.aoti/ packages
            link_or_copy_tree(item, dst / item.name)
            continue
        try:
            os.link(item, dst / item.name)
        except OSError:
            shutil.copy2(item, dst / item.name)
