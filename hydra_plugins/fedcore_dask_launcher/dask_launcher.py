"""``hydra/launcher=dask``: every job of a multirun is one task on the configured Dask cluster.

    fedcore-adapter -m setup=raw,composite_1,composite_2 hydra/launcher=dask cluster=local

Thin on purpose: Hydra imports every installed plugin when any Hydra app starts, so dask and the
rest are imported by ``_core`` only when a sweep is launched.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher


@dataclass
class DaskLauncherConf:
    _target_: str = "hydra_plugins.fedcore_dask_launcher.dask_launcher.DaskLauncher"
    # The cluster (same keys as the app's ``cluster`` group); empty: the app's ``cluster`` config.
    cluster: Dict[str, Any] = field(default_factory=dict)
    # When all jobs have finished: sweep.json and the comparison table + plot in the sweep folder.
    report: bool = True
    # Seconds between progress lines while no job finishes.
    heartbeat_s: float = 30.0


ConfigStore.instance().store(group="hydra/launcher", name="dask", node=DaskLauncherConf, provider="fedcore_adapter")


class DaskLauncher(Launcher):
    def __init__(self, cluster: Optional[Dict[str, Any]] = None, report: bool = True, heartbeat_s: float = 30.0):
        self.cluster = cluster
        self.report = report
        self.heartbeat_s = heartbeat_s
        self.config = self.task_function = self.hydra_context = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from . import _core  # lazy: dask and the package; Hydra imports this module in every app (see above)

        return _core.launch(self, job_overrides, initial_job_idx)
