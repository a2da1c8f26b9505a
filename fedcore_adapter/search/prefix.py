"""Computed chain prefixes, keyed by what determines them (the input model, the common options, the node
configs), each a checkpoint folder a trial starts from instead of computing it again."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..results import write_json
from ..training_cache import module_digest


def prefix_key(identity: str, common: dict, nodes: Sequence[dict]) -> str:
    data = {"input": identity, "common": {k: v for k, v in common.items() if k != "seed"},
            "seed": common.get("seed"), "nodes": list(nodes)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]


class PrefixCache:
    """``index.json`` in the search folder: prefix key -> checkpoint folder (relative to the search folder)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / "prefix" / "index.json"
        self.index: dict[str, str] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str) -> Optional[Path]:
        rel = self.index.get(key)
        if rel is None:
            return None
        path = self.folder / rel
        return path if (path / "manifest.json").exists() else None

    def put(self, key: str, checkpoint: Path) -> None:
        try:
            rel = str(Path(checkpoint).resolve().relative_to(self.folder.resolve()))
        except ValueError:
            rel = str(Path(checkpoint).resolve())
        self.index[key] = rel
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.index)

    def longest(self, identity: str, common: dict, nodes: Sequence[dict], shortest: int) -> tuple[int, Optional[Path]]:
        """``(j, checkpoint)`` of the longest cached prefix ``nodes[:j]`` (``j >= shortest``), leaving a node to run."""
        for j in range(len(nodes) - 1, shortest - 1, -1):
            found = self.get(prefix_key(identity, common, nodes[:j])) if j else None
            if found is not None:
                return j, found
        return 0, None


def _saved_digest(model: Any) -> str:
    """A digest of ``model``'s structure and of its state as ``torch.save`` writes it (packed int8 weights too)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return hashlib.sha256(repr(model).encode() + buffer.getvalue()).hexdigest()


def identity_of(cfg: dict, model: Any = None) -> str:
    """What the search's input model is: its config, its ``pretrained`` file (size, mtime), or its structure and
    weights."""
    data = {k: cfg.get(k) for k in ("model", "data", "loss")}
    pretrained = cfg.get("pretrained")
    if pretrained:
        p = Path(str(pretrained))
        state = next((c for c in (p / "state.pt", p / "final" / "state.pt", p) if c.is_file()), None)
        data["pretrained"] = [str(p.resolve()), *((state.stat().st_size, state.stat().st_mtime_ns) if state else ())]
    if model is not None:
        data["weights"] = module_digest(model) or _saved_digest(model)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]
