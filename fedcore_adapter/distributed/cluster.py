"""Start or reach the configured Dask cluster and hand out a client (the one place clusters are opened)."""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from typing import Any, Iterator, Optional

import dask
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.security import Security

from ..errors import ConfigError, error_line
from .config import ClusterConfig, parse_cluster

log = logging.getLogger("fedcore_adapter.distributed")
PLUGIN_NAME = "fedcore-torch-threads"
_HEALTH = "distributed.http.health"
# Dask's nanny starts worker processes with MALLOC_TRIM_THRESHOLD_=65536 (against memory fragmentation); glibc
# then returns freed memory to the OS after nearly every tensor, and torch training on CPU runs ~1.5x slower
# (benchmarks/RESULTS.md, Search). Workers started here go without it; workers started elsewhere are warned of.
_MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"
_SLOW_TRIM_BELOW = 1 << 20


class TorchThreads(WorkerPlugin):
    """Sets torch's thread count in every worker process (default: the worker's Dask thread count),
    so that workers never oversubscribe the cores they were given."""

    idempotent = True

    def __init__(self, n: Optional[int] = None):
        self.n = n

    def setup(self, worker: Any) -> None:
        n = self.n or worker.state.nthreads
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(n)
        else:  # read by torch's OpenMP / MKL runtimes when a task first imports it here
            os.environ.update(OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))


def _security(cfg: ClusterConfig) -> Optional[Security]:
    """TLS settings: a cluster started here uses temporary credentials unless ``security=false``, so that no
    other process on the machine can connect to it; a running scheduler gets the user's ``Security`` settings."""
    if cfg.security is None and cfg.mode == "local":
        return Security.temporary()
    if cfg.security is None or cfg.security is False:
        return None
    if cfg.security is True:
        if cfg.mode == "address":
            raise ConfigError("cluster.security = True: temporary credentials only work for a cluster started here; "
                              "for cluster.address give the scheduler's TLS files, "
                              "e.g. cluster.security.tls_ca_file=...")
        return Security.temporary()
    try:
        return Security(**cfg.security)
    except TypeError as err:
        raise ConfigError(f"cluster.security = {cfg.security!r}: {err} (keys are distributed.Security arguments: "
                          f"tls_ca_file, tls_client_cert, tls_client_key, require_encryption, ...)") from None


def _import_target(target: str) -> type:
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as err:
        missing = (err.name or module).partition(".")[0]
        raise ConfigError(f"cluster._target_ = {target!r} could not be imported: {err} (install the package that "
                          f"provides it, e.g. pip install {missing.replace('_', '-')})") from None
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"cluster._target_ = {target!r} could not be imported: {err} (expected "
                          f"package.module.ClassName of a Dask cluster manager, e.g. dask_jobqueue.SLURMCluster)"
                          ) from None


def _start_cluster(cfg: ClusterConfig) -> Any:
    """A LocalCluster (127.0.0.1, worker processes, dashboard off unless asked) or the ``_target_`` manager."""
    settings: dict[str, Any] = {"distributed.scheduler.allowed-failures": cfg.allowed_failures}
    if cfg.mode == "local":  # None unsets it (an environment variable the user set still wins)
        settings[f"distributed.nanny.pre-spawn-environ.{_MALLOC_TRIM}"] = None
    if cfg.mode == "local" and cfg.dashboard_address is None:  # no dashboard: HTTP serves /health only
        settings.update({"distributed.scheduler.http.routes": [_HEALTH], "distributed.worker.http.routes": [_HEALTH]})
    with dask.config.set(settings):
        if cfg.mode == "manager":
            cls = _import_target(cfg.target)
            kwargs = cfg.manager_kwargs()
            if "security" in kwargs:
                kwargs["security"] = _security(cfg)
            try:
                return cls(**kwargs)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"cluster._target_ = {cfg.target!r} could not be built with "
                                  f"{sorted(kwargs)}: {err}") from None
        security = _security(cfg)
        dashboard = cfg.local_dashboard()
        return LocalCluster(n_workers=cfg.local_workers(), threads_per_worker=cfg.threads_per_worker, processes=True,
                            host="127.0.0.1", dashboard_address=dashboard, memory_limit=cfg.memory_limit,
                            scheduler_kwargs=None if dashboard else {"dashboard": False,
                                                                     "dashboard_address": "127.0.0.1:0"},
                            **({"security": security} if security is not None else {}))


def _connect(cfg: ClusterConfig) -> Client:
    security = _security(cfg)
    tls = (security or Security()).get_connection_args("client").get("ssl_context")  # Security(): Dask's config
    if cfg.address.startswith("tls://") and tls is None:
        raise ConfigError(f"cluster.address = {cfg.address!r}: a TLS scheduler needs TLS settings; give "
                          f"cluster.security.tls_ca_file, tls_client_cert and tls_client_key (or Dask's "
                          f"distributed.comm.tls configuration)")
    try:
        return Client(cfg.address, timeout=cfg.timeout, security=security, set_as_default=False)
    except OSError as err:  # includes TimeoutError
        reason = error_line(err, typed=False)
        raise ConfigError(f"cluster.address = {cfg.address!r}: no Dask scheduler answered within {cfg.timeout:g} s "
                          f"({reason}); start one with `dask scheduler`, or check host, port and cluster.security"
                          ) from None


def _wait_for_workers(client: Client, cfg: ClusterConfig) -> None:
    if not cfg.wait_for_workers:
        return
    try:
        client.wait_for_workers(cfg.wait_for_workers, timeout=cfg.timeout)
    except (TimeoutError, OSError):
        have = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        raise ConfigError(f"cluster: {cfg.describe()} has {have} worker(s) after {cfg.timeout:g} s, needs "
                          f"{cfg.wait_for_workers} (cluster.wait_for_workers); start workers with "
                          f"`dask worker <address>` or raise cluster.timeout") from None


def _malloc_trim_threshold() -> Optional[str]:
    return os.environ.get(_MALLOC_TRIM)


def _warn_slow_malloc_trim(client: Client) -> None:
    """One warning when workers run with a small MALLOC_TRIM_THRESHOLD_ (Dask's nanny default), naming the fix."""
    try:
        values = client.run(_malloc_trim_threshold)
    except Exception:  # noqa: BLE001 - a diagnostic: a worker that cannot answer is not an error here
        return
    slow = {v for v in values.values() if v is not None and v.isdigit() and int(v) < _SLOW_TRIM_BELOW}
    if slow:
        log.warning("dask: %d of %d worker(s) run with %s=%s (Dask's nanny default), which makes torch training "
                    "on CPU about 1.5x slower; start them with the Dask config distributed.nanny.pre-spawn-environ."
                    "%s: null (clusters started by fedcore-adapter do this)", sum(v in slow for v in values.values()),
                    len(values), _MALLOC_TRIM, "/".join(sorted(slow)), _MALLOC_TRIM)


@contextlib.contextmanager
def _quiet_dask_logs() -> Iterator[None]:
    """Dask's INFO chatter (scheduler, nanny, client) stays out of the run's log; warnings still show."""
    logger = logging.getLogger("distributed")
    before = logger.level
    logger.setLevel(max(before, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(before)


def describe_client(client: Client) -> str:
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    threads = sum(w.get("nthreads", 0) for w in workers.values())
    return f"{len(workers)} worker(s), {threads} thread(s) at {client.scheduler.address}"


@contextlib.contextmanager
def open_client(spec: Any) -> Iterator[Client]:
    """A client on the cluster described by ``spec`` (a ``cluster`` mapping); closes what it started."""
    cfg = parse_cluster(spec)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_dask_logs())
        if cfg.mode == "address":
            client = _connect(cfg)
        else:
            if cfg.mode == "local" and cfg.name == "none":
                log.info("cluster=none: starting a default %s", cfg.describe())
            cluster = _start_cluster(cfg)
            stack.callback(cluster.close)
            client = Client(cluster, set_as_default=False, timeout=cfg.timeout)
        stack.callback(client.close)
        client.fedcore_no_worker_timeout = cfg.no_worker_timeout  # read by fanout.run_tasks
        _wait_for_workers(client, cfg)
        client.register_plugin(TorchThreads(cfg.torch_threads), name=PLUGIN_NAME)
        _warn_slow_malloc_trim(client)
        log.info("dask: %s", describe_client(client))
        yield client
