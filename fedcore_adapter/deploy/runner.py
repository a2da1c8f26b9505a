"""A runner: a callable module that runs an exported artifact in its runtime.

``metrics.measure`` times, evaluates and sizes a runner like any model: it calls it as the torch
model is called, and reads ``runtime``, ``threads``, ``weight_dtype``, ``artifact_bytes()`` and
``reference_model`` (the float torch model it was exported from, for params and MACs; None when
the artifact was loaded on its own).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .signature import Signature


class Runner(nn.Module):
    runtime = "torch"

    def __init__(self, artifact: Path, files: Sequence[Path], signature: Signature, threads: Optional[int],
                 weight_dtype: str, reference: Optional[nn.Module] = None):
        super().__init__()
        self.artifact = Path(artifact)
        self.files = [Path(f) for f in files]
        self._bytes = sum(f.stat().st_size for f in self.files)  # the node's files move into its folder later
        self.signature = signature
        self.threads = threads
        self.weight_dtype = weight_dtype
        object.__setattr__(self, "reference_model", reference)  # not a submodule: the runner holds no weights

    def artifact_bytes(self) -> int:
        """Bytes on disk of everything the runtime loads (e.g. ``model.xml`` + ``model.bin``)."""
        return self._bytes

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.run(self.signature.bind(args, kwargs))

    def run(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"runtime={self.runtime}, artifact={self.artifact.name}, threads={self.threads}"


def numpy_inputs(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    return [t.detach().cpu().contiguous().numpy() for t in tensors]


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``||y - y_ref|| / ||y_ref||`` over the whole batch (0 when both are zero)."""
    reference = reference.detach().float()
    diff = float(torch.linalg.vector_norm(output.detach().float() - reference))
    norm = float(torch.linalg.vector_norm(reference))
    return diff / norm if norm else diff
