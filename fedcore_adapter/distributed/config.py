"""The ``cluster`` option: which Dask cluster runs the work (validated, no dask import here).

Four forms, chosen by the keys that are set:

- ``address: tcp://host:8786``  connect to a running scheduler (``security`` passes TLS settings through);
- ``_target_: dask_jobqueue.SLURMCluster`` (+ its arguments)  any Dask cluster manager class;
- ``name: local``  a ``LocalCluster`` of worker processes on 127.0.0.1, dashboard off unless asked;
- ``name: none`` (or nothing)  no cluster configured: where Dask is asked for, a default local cluster.
"""
from __future__ import annotations

import os
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError
from ..schema import validation_message

Mode = Literal["local", "address", "manager"]
# Keys this module reads itself; with ``_target_`` every other key is an argument of the manager class.
_OWN_KEYS = {"name", "address", "_target_", "timeout", "allowed_failures", "torch_threads", "wait_for_workers",
             "no_worker_timeout"}
_LOCAL_KEYS = {"n_workers", "threads_per_worker", "memory_limit", "dashboard_address", "security"}


class ClusterConfig(BaseModel):
    """What ``cluster=...`` / ``cluster.<field>=...`` may hold."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    name: str = "none"
    address: Optional[str] = Field(None, description="scheduler address, e.g. tcp://10.0.0.5:8786")
    target: Optional[str] = Field(None, alias="_target_",
                                  description="cluster manager class, e.g. dask_jobqueue.SLURMCluster")
    n_workers: Optional[int] = Field(None, ge=1,
                                     description="local: worker processes (default: cores / threads_per_worker)")
    threads_per_worker: int = Field(1, ge=1, description="local: Dask threads per worker process")
    memory_limit: Union[str, float, int, None] = Field("auto", description="local: memory limit per worker")
    dashboard_address: Optional[str] = Field(None, description="local: e.g. ':8787' (served on 127.0.0.1); null: off")
    security: Union[bool, dict, None] = Field(None, description="local: temporary TLS unless false (null: the "
                                                                 "default, TLS); a mapping: "
                                                                 "distributed.Security(**mapping)")
    timeout: float = Field(10.0, gt=0, description="seconds to reach the scheduler and see a worker")
    wait_for_workers: int = Field(1, ge=0, description="workers to wait for before submitting")
    no_worker_timeout: float = Field(120.0, gt=0, description="seconds runs wait with no live worker before they "
                                                                "fail (the cluster lost its workers)")
    allowed_failures: int = Field(3, ge=0, description="local scheduler: worker deaths a task survives (retries)")
    torch_threads: Optional[int] = Field(None, ge=1,
                                         description="torch threads in each worker (default: its Dask threads)")

    @property
    def mode(self) -> Mode:
        if self.address:
            return "address"
        if self.target:
            return "manager"
        return "local"

    def manager_kwargs(self) -> dict[str, Any]:
        """Arguments for the ``_target_`` class: every key the user set that this module does not read."""
        given = {k: getattr(self, k) for k in self.model_fields_set if k != "target"}
        given.update(self.model_extra or {})
        return {k: v for k, v in given.items() if k not in _OWN_KEYS}

    def local_workers(self) -> int:
        if self.n_workers:
            return self.n_workers
        return max(1, len(os.sched_getaffinity(0)) // self.threads_per_worker)

    def local_dashboard(self) -> Optional[str]:
        """The dashboard address, bound to 127.0.0.1 when only a port is given."""
        if self.dashboard_address is None:
            return None
        address = self.dashboard_address
        return f"127.0.0.1{address}" if address.startswith(":") else address

    def describe(self) -> str:
        if self.mode == "address":
            return f"scheduler {self.address}"
        if self.mode == "manager":
            return f"{self.target}"
        return f"local cluster ({self.local_workers()} workers x {self.threads_per_worker} thread(s), 127.0.0.1)"


def parse_cluster(spec: Any) -> ClusterConfig:
    """Validate a ``cluster`` mapping; errors are one line naming the field, the value and what is allowed."""
    if isinstance(spec, ClusterConfig):
        return spec
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"cluster must be a mapping such as cluster=local or cluster.address=tcp://host:8786 "
                          f"(got {spec!r})")
    data = {k: v for k, v in spec.items() if not (k == "address" and v in (None, ""))}
    if not data.get("_target_"):
        data.pop("_target_", None)
        allowed = sorted((set(ClusterConfig.model_fields) - {"target"}) | {"_target_"})
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(f"cluster.{unknown[0]}: unknown option for cluster {data.get('name', 'none')!r}; "
                              f"allowed: {', '.join(allowed)} (other keys are arguments of a cluster manager "
                              f"given by cluster._target_)")
    if data.get("address") and not str(data["address"]).partition("://")[2]:
        raise ConfigError(f"cluster.address = {data['address']!r}: expected a scheduler address like "
                          f"tcp://host:8786 or tls://host:8786")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_message("cluster", err, ClusterConfig)) from None

