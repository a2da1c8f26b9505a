"""Trainings reused across runs: a ``trainer.train`` call whose inputs equal those of one computed before (the same
model weights and structure, teacher, options, data, thread count and random state, the data loaders' own
generators included) restores that call's result (the trained weights, its history and the random state it left)
instead of training again.

The search turns it on for its trials (``<search>/prefix/training/``): trials that differ only after a training
share it, e.g. the U,S,Vh training of a low-rank node whose thresholds are re-drawn, or the fine-tune of a
truncation that gave the same ranks. Every node seeds the random generators with its index, so a training from
equal inputs gives equal weights: restoring it changes no result, only the time spent (the node's metrics row
notes it). Entries are plain ``torch.save`` files keyed by a digest of those inputs; writes are atomic, so two
workers that train the same thing at once each write a whole entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn


def module_digest(module: nn.Module) -> Optional[str]:
    """A digest of ``module``'s structure (its printed form) and state; None when a state entry is not a plain
    tensor (packed int8 weights...): such a model is never reused."""
    digest = hashlib.sha256(repr(module).encode())
    for name, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor) or value.is_quantized or value.layout != torch.strided:
            return None
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def loader_generators(*loaders: Any) -> list[torch.Generator]:
    """The torch generators ``loaders`` shuffle with (a loader's or its sampler's own ``generator``)."""
    found: dict[int, torch.Generator] = {}
    for loader in loaders:
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        for owner in (loader, sampler, batch_sampler):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator):
                found.setdefault(id(generator), generator)
    return list(found.values())


def random_state(generators: Sequence[torch.Generator] = ()) -> dict:
    """The generators a training draws from: torch's, Python's and NumPy's global ones and ``generators`` (the
    data loaders' own)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "generators": [g.get_state() for g in generators]}


def set_random_state(state: Mapping[str, Any], generators: Sequence[torch.Generator] = ()) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    for generator, saved in zip(generators, state["generators"]):
        generator.set_state(saved)


def _state_digest(state: Mapping[str, Any]) -> str:
    numpy_state = state["numpy"]
    parts = [state["torch"].numpy().tobytes(), repr(state["python"]).encode(),
             repr((numpy_state[0], numpy_state[2:])).encode(), np.asarray(numpy_state[1]).tobytes(),
             *(g.numpy().tobytes() for g in state["generators"])]
    return hashlib.sha256(b"|".join(parts)).hexdigest()


class TrainingCache:
    """``<folder>/<key>.pt``: ``{"state": trained state_dict, "report": TrainReport, "random": states after}``;
    beyond ``max_bytes`` in all, the entries used longest ago are removed."""

    def __init__(self, folder: str | Path, max_bytes: Optional[int] = None):
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    def key(self, options: Mapping[str, Any], modules: Mapping[str, Optional[nn.Module]],
            generators: Sequence[torch.Generator] = ()) -> Optional[str]:
        """The digest of a training's inputs: ``options`` (JSON-able: the training parameters, the common
        options, what the loss adds), each of ``modules`` (the model trained, its teachers) and the random state
        now (``generators``: the data loaders' own); None when a module cannot be digested."""
        digests = {}
        for name, module in modules.items():
            if module is None:
                continue
            digests[name] = module_digest(module)
            if digests[name] is None:
                return None
        data = {"options": options, "modules": digests, "random": _state_digest(random_state(generators)),
                "threads": torch.get_num_threads()}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def load(self, key: str) -> Optional[dict]:
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=False)
            os.utime(path)  # used now: the last to be removed
            return entry
        except Exception:  # noqa: BLE001 - an unreadable (or just removed) entry is trained again
            return None

    def save(self, key: str, state: Mapping[str, torch.Tensor], report: Any,
             generators: Sequence[torch.Generator] = ()) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = {"state": {k: v.detach().cpu() for k, v in state.items()}, "report": report,
                 "random": random_state(generators)}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(entry, tmp)
            os.replace(tmp, self.folder / f"{key}.pt")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._trim(keep=f"{key}.pt")

    def _trim(self, keep: str) -> None:
        """Remove the entries used longest ago while all of them exceed ``max_bytes`` (never ``keep``)."""
        if self.max_bytes is None:
            return
        entries = []
        for path in self.folder.glob("*.pt"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed by another worker meanwhile
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path.name != keep:
                path.unlink(missing_ok=True)
                total -= size
