"""Engine hooks: how tracking and other side concerns see a run without the engine asking."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("fedcore_adapter")


@dataclass
class RunInfo:
    """What hooks know of the run. ``state`` is persisted in run.json (e.g. a tracking run id for resume)."""

    setup: Any
    output_dir: Path
    run_name: str
    config: dict
    resumed: bool = False
    state: dict = field(default_factory=dict)


class Hook:
    """Override any subset. Hooks must not raise for their own failures: they log and go on."""

    def before_run(self, run: RunInfo) -> None: ...
    def before_node(self, run: RunInfo, index: int, node: Any) -> None: ...
    def on_log(self, run: RunInfo, index: int, node: Any, metrics: dict, step: Optional[int]) -> None: ...
    def after_node(self, run: RunInfo, index: int, node: Any, model: nn.Module, row: dict,
                   checkpoint: Path) -> None: ...
    def after_measure_input(self, run: RunInfo, row: dict, checkpoint: Path) -> None: ...
    def after_run(self, run: RunInfo, result: Any) -> None: ...
    def on_error(self, run: RunInfo, index: Optional[int], node: Any, error: BaseException) -> None: ...
    def on_interrupt(self, run: RunInfo, index: Optional[int], node: Any, signum: int) -> None:
        """Ctrl-C or SIGTERM stopped the run (``signum``); end what is open as killed, quickly."""


class HookList(Hook):
    """Fans each call out to several hooks; a failing hook is logged, never fatal to the run."""

    def __init__(self, hooks: Sequence[Hook] = ()):
        self.hooks = list(hooks)

    def _call(self, name: str, *args: Any) -> None:
        for hook in self.hooks:
            try:
                getattr(hook, name)(*args)
            except Exception as err:  # noqa: BLE001 - side concerns never fail the run
                log.warning("hook %s.%s failed: %s", type(hook).__name__, name, err)

    def before_run(self, *a): self._call("before_run", *a)
    def before_node(self, *a): self._call("before_node", *a)
    def on_log(self, *a): self._call("on_log", *a)
    def after_node(self, *a): self._call("after_node", *a)
    def after_measure_input(self, *a): self._call("after_measure_input", *a)
    def after_run(self, *a): self._call("after_run", *a)
    def on_error(self, *a): self._call("on_error", *a)
    def on_interrupt(self, *a): self._call("on_interrupt", *a)
