"""Distributed runs on Dask: the only package (with the Hydra launcher plugin) that imports dask.

- ``open_client(cluster)``: a client on ``cluster=local`` / ``cluster.address=...`` / ``cluster._target_=...``;
- ``executor_from_config(cluster)``: ``ctx.map`` on the cluster when ``distributed_compression=true``;
- ``run_many(configs, cluster)``: whole runs fanned out, one Dask task each, then one comparison;
- ``fedcore-adapter sweep``: the same from the command line (``sweep.main``).

Submodules are imported on first use, so importing this package does not import dask.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClusterConfig": "config",
    "parse_cluster": "config",
    "open_client": "cluster",
    "TorchThreads": "cluster",
    "DaskExecutor": "executor",
    "executor_from_config": "executor",
    "TaskResult": "fanout",
    "run_tasks": "fanout",
    "run_many": "runs",
    "sweep_main": "sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, "main" if name == "sweep_main" else name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
