"""Progress bars on the terminal (tqdm), each with its total and ETA: the whole run, a node's epochs, an
epoch's batches.

Shown only when stderr is a terminal: logs, CI and Dask workers get the line-based log instead
(``node 1:pruning (2/4) ...``). The run bar counts work units: 1 for the input measurement, and per
node 1 + its epochs (every ``epochs`` of the node's settings, the pruning iterations' fine-tunes
included), so its ETA weighs a 100-epoch training above a quantization.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Mapping, Optional

from .data import limited
from .hooks import Hook, RunInfo


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def _bar(**kwargs: Any):
    from tqdm.auto import tqdm

    try:
        known = os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        known = False
    if known:  # follows the window's width
        return tqdm(dynamic_ncols=True, **kwargs)
    return tqdm(ncols=int(os.environ.get("COLUMNS") or 100), **kwargs)  # a terminal that reports no size


def node_work(node: Any) -> int:
    """Work units of a node: 1 (apply + measure) + its epochs (nested ``epochs`` too, once per pruning iteration)."""
    data = node.model_dump() if hasattr(node, "model_dump") else dict(node)
    iterations = data.get("pruning_iterations") if isinstance(data.get("pruning_iterations"), int) else 1
    return 1 + _epochs(data) * max(iterations, 1)


def _epochs(data: Any) -> int:
    if isinstance(data, Mapping):
        return sum(v if k == "epochs" and isinstance(v, int) else _epochs(v) for k, v in data.items())
    if isinstance(data, (list, tuple)):
        return sum(_epochs(v) for v in data)
    return 0


def epoch_bar(epochs: int, label: str, show: bool = True):
    """A node's epochs (``label`` names the node)."""
    return _bar(total=epochs, desc=f"{label} epochs", unit="epoch", leave=False, disable=not (show and on_terminal()))


def batch_bar(loader: Iterable, limit: Optional[int], label: str, show: bool = True):
    """An epoch's batches (at most ``limit``); the total is ``len(loader)`` (capped) when the loader has one."""
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if limit is not None:
        total = min(total, limit) if total is not None else limit
    return _bar(iterable=limited(loader, limit), total=total, desc=label, unit="batch", leave=False,
                disable=not (show and on_terminal()))


class RunProgress(Hook):
    """The whole run's bar: work units done of the total, the node under way, and the ETA."""

    def __init__(self) -> None:
        self.bar = None
        self.done_before: list[int] = []
        self.node_units: list[int] = []
        self.index = 0

    def before_run(self, run: RunInfo) -> None:
        if not on_terminal():
            return
        self.node_units = [node_work(n) for n in run.setup.nodes]
        self.done_before = [1 + sum(self.node_units[:i]) for i in range(len(self.node_units))]
        self.bar = _bar(total=1 + sum(self.node_units), desc=f"{run.setup.name}", unit="unit", position=0)

    def after_measure_input(self, run: RunInfo, row: dict, checkpoint: Any) -> None:
        self._to(1, "input measured")

    def before_node(self, run: RunInfo, index: int, node: Any) -> None:
        self.index = index
        if self.bar is not None:
            self._to(self.done_before[index], f"node {index + 1}/{len(self.node_units)} {node.kind}")

    def on_log(self, run: RunInfo, index: int, node: Any, metrics: dict, step: Optional[int]) -> None:
        if self.bar is not None and step is not None:  # an epoch ended: one unit, never past the node's share
            self._to(min(self.bar.n + 1, self.done_before[index] + self.node_units[index] - 1))

    def after_node(self, run: RunInfo, index: int, node: Any, model: Any, row: dict, checkpoint: Any) -> None:
        if self.bar is not None:
            self._to(self.done_before[index] + self.node_units[index])

    def after_run(self, run: RunInfo, result: Any) -> None:
        self._close()

    def on_error(self, run: RunInfo, index: Optional[int], node: Any, error: BaseException) -> None:
        self._close()

    def _to(self, n: int, status: Optional[str] = None) -> None:
        if self.bar is None:
            return
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)
        if status:
            self.bar.set_postfix_str(status)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
