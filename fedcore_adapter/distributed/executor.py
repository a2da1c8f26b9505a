"""``distributed_compression=true``: a node's independent per-layer measurements (``ctx.map``) as Dask tasks."""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Iterable, Iterator

from distributed import Client, get_worker

from ..context import SequentialExecutor
from .cluster import open_client

log = logging.getLogger("fedcore_adapter.distributed")


_MEASURE_LOCK = threading.Lock()


def _apply(item: Any, fn: Callable) -> Any:
    # The tasks of one map share one ``fn`` object per worker; measurements often change a layer and
    # restore it, so calls in one process never overlap, exactly as in the sequential map.
    with _MEASURE_LOCK:
        return fn(item)


class DaskExecutor:
    """``map(fn, items)``: one task per item on the cluster, results in input order (as the sequential map).

    ``fn`` (typically a ``functools.partial`` holding the model) is sent once and shared by the tasks
    of a worker, which call it one at a time (a worker's threads speed up each call through torch).
    ``fn`` must be deterministic (no global RNG), as its calls run in other processes.
    An exception raised by ``fn`` is raised here, as it would be sequentially.
    """

    def __init__(self, client: Client):
        self.client = client

    def map(self, fn: Callable, items: Iterable) -> list:
        items = list(items)
        if not items:
            return []
        shared = self.client.scatter(fn, hash=False)
        futures = self.client.map(_apply, items, fn=shared, pure=False)
        try:
            return self.client.gather(futures)
        finally:
            self.client.cancel([*futures, shared])


def in_worker() -> bool:
    """True inside a Dask task (a whole run fanned out to a worker)."""
    try:
        get_worker()
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def executor_from_config(cluster_cfg: Any) -> Iterator[Any]:
    """The executor for ``ctx.map`` when ``distributed_compression`` is on.

    A run that is itself a Dask task (a sweep) measures in its own worker: the cluster's slots are
    already taken by whole runs, and waiting on nested tasks from them could deadlock the cluster.
    """
    if in_worker():
        log.info("distributed_compression: this run is a Dask task; its per-layer measurements run in its worker")
        yield SequentialExecutor()
        return
    with open_client(cluster_cfg) as client:
        yield DaskExecutor(client)
