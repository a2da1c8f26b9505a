"""Trials of a search as Dask tasks: as many in flight as there are workers, collected as they finish.

A worker process that dies mid-trial is the scheduler's business (the task goes to another worker, up to
``cluster.allowed_failures`` deaths); past that the trial comes back ``lost`` and the search re-runs it.
"""
from __future__ import annotations

import uuid
from typing import Any, Callable, Optional

from distributed import Client, wait

from ..errors import error_line
from .fanout import run_slots, run_task


class DaskPool:
    """``submit(key, payload)`` then ``finished()``: ``[(key, outcome)]`` of the tasks done, outcome as
    ``fanout.run_task`` returns it (``status``, ``value``, ``error``, ``worker``, ``wall_s``; ``lost``)."""

    def __init__(self, client: Client, fn: Callable[[Any], Any], cwd: Optional[str] = None):
        self.client, self.fn, self.cwd = client, fn, cwd
        self.tag = uuid.uuid4().hex[:8]
        self.futures: dict[Any, Any] = {}

    @property
    def slots(self) -> int:
        return run_slots(self.client)

    def __len__(self) -> int:
        return len(self.futures)

    def submit(self, key: Any, payload: Any) -> None:
        self.futures[key] = self.client.submit(run_task, self.fn, payload, self.cwd, key=f"fedcore-trial-{key}-"
                                               f"{self.tag}-{uuid.uuid4().hex[:6]}", pure=False)

    def finished(self, timeout: Optional[float] = None) -> list[tuple[Any, dict]]:
        if not self.futures:
            return []
        try:
            with self.client.as_current():
                done = wait(list(self.futures.values()), timeout=timeout, return_when="FIRST_COMPLETED").done
        except TimeoutError:
            return []
        out = []
        for key, future in list(self.futures.items()):
            if future not in done:
                continue
            del self.futures[key]
            try:
                out.append((key, future.result()))
            except Exception as err:  # noqa: BLE001 - KilledWorker: the worker died too often
                out.append((key, {"status": "failed", "value": None, "error": error_line(err), "lost": True,
                                  "worker": None, "wall_s": None}))
        return out

    def close(self) -> None:
        self.client.cancel(list(self.futures.values()))
        self.futures.clear()
