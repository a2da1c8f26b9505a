"""What a node's ``apply(model, config, ctx)`` may use: data, loss, device, teacher, output folder."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .schema import CommonConfig


class SequentialExecutor:
    """Runs independent measurements one after another (the default executor)."""

    def map(self, fn: Callable, items: Iterable) -> list:
        return [fn(item) for item in items]


@dataclass
class NodeContext:
    """Everything a node needs, passed explicitly (no globals)."""

    train_loader: Any
    val_loader: Any
    test_loader: Any
    loss_fn: Optional[Callable]
    device: torch.device
    teacher: nn.Module
    output_dir: Path
    common: CommonConfig
    node_index: int = 0
    node_label: str = ""
    executor: Any = field(default_factory=SequentialExecutor)
    logger: Callable[[dict, Optional[int]], None] = lambda metrics, step=None: None
    structure_recorder: Callable[[str, Any], None] = lambda name, data: None
    checkpointer: Callable[[nn.Module, str], None] = lambda model, tag: None
    checkpoint_options: dict = field(default_factory=dict)  # extra save_checkpoint options for this node's output
    notes: list[str] = field(default_factory=list)  # remarks for this node's metrics row (``note`` column)
    training_cache: Any = None  # a TrainingCache: trainings equal to earlier ones are restored (the search's trials)

    def log(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        """Log training curves (``train_loss``, ``val_loss``, ``val_accuracy``...) at ``step`` (the epoch)."""
        self.logger(metrics, step)

    def note(self, text: str) -> None:
        """A remark shown in this node's metrics row (``note``), e.g. why the node left the model unchanged."""
        self.notes.append(text)

    def record_structure(self, name: str, data: Any) -> None:
        """Record a structural change (registered with ``structure.register_replay``) for checkpoints."""
        self.structure_recorder(name, data)

    def save_intermediate(self, model: nn.Module, tag: str) -> None:
        """Checkpoint ``model`` inside the node (``save_each``), as ``<node folder>/<tag>``."""
        self.checkpointer(model, tag)

    def map(self, fn: Callable, items: Iterable) -> list:
        """Run independent measurements, on the cluster when ``distributed_compression`` is on."""
        return self.executor.map(fn, list(items))

    def limit(self, which: str, override: Optional[int] = None) -> Optional[int]:
        """Batch limit for ``which`` in train/valid/test: the node's override, else the setup's."""
        return override if override is not None else getattr(self.common, f"limit_{which}_batches")
