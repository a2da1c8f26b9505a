"""Python API: ``run_setup`` runs a setup on a model and a data module."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from .building import build_run, resolve_setup
from .engine import RunResult
from .hooks import Hook


def run_setup(setup: Any, model: nn.Module, datamodule: Any, *, loss: Any = None,
              output_dir: Optional[str | Path] = None, model_name: Optional[str] = None, resume: bool = False,
              hooks: Sequence[Hook] = (), executor: Any = None, overrides: Optional[dict] = None,
              config: Optional[dict] = None, teacher: Optional[nn.Module] = None) -> RunResult:
    """Run ``setup`` (a name, a path, a dict or a Setup) on ``model`` and ``datamodule``.

    Returns a :class:`RunResult` with ``.model`` (compressed), ``.metrics`` (one row
    per node, row 0 the input model) and ``.output_dir`` (the results folder).
    ``overrides`` is ``{'common': {...}, 'nodes': {<index or kind>: {...}}}``. ``teacher``: the model
    distillation nodes learn from and rebuild ``teacher_checkpoint`` on (default: ``model``), e.g. the
    original model when ``model`` is an already pruned checkpoint.
    """
    return build_run(resolve_setup(setup, overrides), model=model, data=datamodule, loss=loss, output_dir=output_dir,
                     model_name=model_name, resume=resume, hooks=list(hooks), executor=executor, config=config,
                     teacher=teacher)
