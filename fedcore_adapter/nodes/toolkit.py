"""What every node family shares: calibration inputs, temporary forward hooks, the per-layer
measurement loop, and the fine-tune options a node's config passes on.

- :func:`calibration_inputs` / :func:`input_batches` / :func:`calibration_limit`: model inputs (targets
  dropped) of a few batches, and how many;
- :func:`forward_hooks`: hooks on named layers for the length of a ``with`` block (removed on exit,
  even on error), :func:`evaluating`: eval mode for a block, the training flag restored after;
- :func:`per_layer`: the one loop that measures layers independently (``ctx.map``: on the Dask
  cluster when ``distributed_compression`` is on), results keyed by layer; :func:`write_report`: its JSON;
- :func:`inherit_finetune`: a ``finetune_params`` mapping takes the node's ``learning_rate`` where it
  gives none (pydantic ``mode="before"`` validators of compression configs).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar, Union

import torch
from torch import nn

from ..context import SequentialExecutor
from ..data import limited, split_batch, to_device
from ..errors import NodeError
from ..results import write_json

J = TypeVar("J")
R = TypeVar("R")
Hooks = Mapping[Union[str, nn.Module], Callable]


# -- calibration inputs -------------------------------------------------------------------------------------
def input_batches(loader: Any, limit: Optional[int], device: Union[str, torch.device] = "cpu") -> list[Any]:
    """Model inputs (targets dropped) of up to ``limit`` batches of ``loader``, on ``device``; [] for no loader."""
    if loader is None:
        return []
    return [split_batch(to_device(batch, device))[0] for batch in limited(loader, limit)]


def calibration_limit(ctx: Any, override: Optional[int], default: Optional[int] = None) -> Optional[int]:
    """Calibration batches: the node's ``override``, else the setup's ``limit_valid_batches``, else ``default``."""
    return ctx.limit("valid", override) or default


def calibration_inputs(ctx: Any, limit: Optional[int], *, purpose: str = "calibration",
                       device: Union[str, torch.device] = "cpu", label: Optional[str] = None) -> list[Any]:
    """Inputs of up to ``limit`` validation batches (training batches when there are none); a NodeError naming
    ``purpose`` when both loaders yield nothing (``limit``: see :func:`calibration_limit`)."""
    batches = input_batches(ctx.val_loader, limit, device) or input_batches(ctx.train_loader, limit, device)
    if not batches:
        raise NodeError(label or ctx.node_label, f"{purpose} needs calibration data, but the data module's "
                                                 f"val_dataloader() and train_dataloader() yielded no batches")
    return batches


# -- hooks -----------------------------------------------------------------------------------------------------
@contextmanager
def forward_hooks(model: nn.Module, hooks: Optional[Hooks] = None, *, pre: Optional[Hooks] = None) -> Iterator[None]:
    """Within the block, ``hooks`` (``fn(module, args, output)``) and ``pre`` hooks (``fn(module, args)``) run on
    the layers they name (a qualified name in ``model`` or the module itself); all are removed on exit."""
    handles = []

    def module(key: Union[str, nn.Module]) -> nn.Module:
        return key if isinstance(key, nn.Module) else model.get_submodule(key)

    try:
        for key, fn in (pre or {}).items():
            handles.append(module(key).register_forward_pre_hook(fn))
        for key, fn in (hooks or {}).items():
            handles.append(module(key).register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """``models`` in eval mode within the block; each one's training flag restored after."""
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(models, was):
            m.train(flag)


# -- the per-layer loop ----------------------------------------------------------------------------------------
def _job_key(job: Any) -> Hashable:
    return getattr(job, "name", job)


def per_layer(executor: Any, measure: Callable[[J], R], jobs: Iterable[J],
              key: Callable[[J], Hashable] = _job_key) -> dict[Hashable, R]:
    """``{key(job): measure(job)}``, every job measured independently by ``executor.map`` (a node's ``ctx``:
    on the cluster when distributed; ``None``: one by one). ``measure`` and the jobs must pickle (module-level
    functions or ``functools.partial``). The key is the job's ``name``, else the job itself."""
    jobs: Sequence[J] = list(jobs)
    results = (executor or SequentialExecutor()).map(measure, jobs)
    return dict(zip((key(job) for job in jobs), results))


def write_report(ctx: Any, name: str, data: Any) -> None:
    """``data`` as JSON (written atomically) in the node's output folder (``sensitivity.json``,
    ``pruning_report.json``...)."""
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(ctx.output_dir / name, data)


# -- config helpers ------------------------------------------------------------------------------------------
def inherit_finetune(data: dict, inherited: Sequence[str] = ("learning_rate",)) -> dict:
    """``data`` (a raw node mapping) with its ``finetune_params`` mapping taking the node's ``inherited`` fields
    it does not give itself (a null ``custom_loss``, as FedCore writes it, is dropped)."""
    ft = data.get("finetune_params")
    if not isinstance(ft, Mapping):
        return data
    ft = {k: v for k, v in ft.items() if not (k == "custom_loss" and v is None)}
    for name in inherited:
        if name in data and name not in ft:
            ft[name] = data[name]
    return {**data, "finetune_params": ft}
