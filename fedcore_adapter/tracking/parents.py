"""Parent runs above setup runs: the runs of a sweep (or of a search) nest under one run per experiment.

    parents = open_parents(cfgs, name="sweep 2026-12-05_13-50-00", role="sweep")  # sets each cfg's
    ...run the configs...                                   # tracking.parent_run_id (in place)
    close_parents(parents, status="completed", metrics={"runs": 3, "failed": 0}, files=[sweep_dir / "comparison.md"])

A parent is opened in every (store, experiment) the tracked configs log to, since MLflow nests runs
within an experiment. Opening talks to the store from the calling process (the launcher), once per
sweep; when the store cannot be reached the runs are logged unnested, with one warning.
Hydra's basic launcher gets the same through :class:`SweepCallback` (``conf/config.yaml``).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, MutableMapping, Optional, Sequence

from hydra.experimental.callback import Callback

from ..errors import error_line
from .config import default_experiment, parse_tracking_config, resolve_uri
from .records import flatten
from .store import STATUS, connect, log_metrics, log_params, unique_run_name

log = logging.getLogger("fedcore_adapter")
PARENT_ENV = "FEDCORE_PARENT_RUN_ID"  # read by conf/tracking/mlflow.yaml's parent_run_id
SWEEP_FILES = ("comparison.md", "comparison.csv", "comparison.png", "sweep.json")  # logged on the sweep run


@dataclass
class ParentRun:
    uri: str
    experiment: str
    run_id: str
    http: dict = field(default_factory=dict)


def tracking_target(cfg: Mapping[str, Any], model_label: Optional[str] = None) -> Optional[tuple[str, str, dict]]:
    """``(store uri, experiment, http limits)`` the run of ``cfg`` logs to; None when it is not tracked."""
    tracking = cfg.get("tracking")
    if not isinstance(tracking, Mapping) or tracking.get("name", "none") == "none":
        return None
    config = parse_tracking_config({k: v for k, v in tracking.items() if k != "parent_run_id"})
    experiment = config.experiment or default_experiment(cfg, model_label or cfg.get("model_name"))
    return resolve_uri(config.uri), experiment, {"http_timeout_s": config.http_timeout_s,
                                                 "http_retries": config.http_retries}


def open_parents(cfgs: Sequence[MutableMapping[str, Any]], *, name: str, role: str = "sweep",
                 model_labels: Optional[Sequence[Optional[str]]] = None, params: Optional[Mapping[str, Any]] = None,
                 tags: Optional[Mapping[str, str]] = None) -> list[ParentRun]:
    """Open one parent run (``name``, tag ``fedcore.role = role``) per store and experiment of the tracked
    ``cfgs`` and point each cfg's ``tracking.parent_run_id`` at its own (unless it has one already)."""
    labels = list(model_labels) if model_labels else [None] * len(cfgs)
    opened: dict[tuple[str, str], Optional[ParentRun]] = {}
    for cfg, label in zip(cfgs, labels):
        try:
            target = tracking_target(cfg, label)
        except Exception:  # noqa: BLE001 - a bad tracking config fails its own run, with its own message
            continue
        if target is None or cfg["tracking"].get("parent_run_id"):
            continue
        uri, experiment, http = target
        if (uri, experiment) not in opened:
            opened[(uri, experiment)] = _open(uri, experiment, http, name, role, params, tags)
        parent = opened[(uri, experiment)]
        if parent is not None:
            cfg["tracking"] = {**cfg["tracking"], "parent_run_id": parent.run_id}
    return [p for p in opened.values() if p is not None]


def _open(uri: str, experiment: str, http: dict, name: str, role: str, params: Optional[Mapping[str, Any]],
          tags: Optional[Mapping[str, str]]) -> Optional[ParentRun]:
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the runs print their own links
    try:
        client, experiment_id = connect(uri, experiment, **http)
        run = client.create_run(experiment_id, run_name=unique_run_name(client, experiment_id, name),
                                tags={"fedcore.role": role, "fedcore.status": "running", **(tags or {})})
        if params:
            log_params(client, run.info.run_id, {k: str(v)[:6000] for k, v in flatten(dict(params)).items()})
    except Exception as err:  # noqa: BLE001 - the runs still log, unnested
        log.warning("MLflow tracking at %s: no %s run (%s); its runs are logged without a parent", uri, role,
                    error_line(err, typed=False, limit=300))
        return None
    return ParentRun(uri, experiment, run.info.run_id, http)


def reopen_parent(cfg: Mapping[str, Any], run_id: str, model_label: Optional[str] = None) -> Optional[ParentRun]:
    """The parent run ``run_id`` of an interrupted sweep or search, running again (resume); None when ``cfg`` is
    not tracked or the store cannot be reached (one warning: its runs are logged without a parent)."""
    target = tracking_target(cfg, model_label)
    if target is None:
        return None
    uri, experiment, http = target
    try:
        client, _ = connect(uri, None, **http)
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "fedcore.status", "running")
    except Exception as err:  # noqa: BLE001 - the runs still log, unnested
        log.warning("MLflow tracking at %s: the parent run %s was not reopened (%s); its runs are logged without a "
                    "parent", uri, run_id, error_line(err, typed=False, limit=300))
        return None
    return ParentRun(uri, experiment, run_id, http)


def close_parents(parents: Iterable[ParentRun], status: str = "completed",
                  metrics: Optional[Mapping[str, float]] = None, files: Iterable[str | Path] = ()) -> None:
    """End the parent runs (``completed`` / ``failed`` / ``killed``) with their summary metrics and files (a folder
    is logged as the artifact folder of its name)."""
    files = [Path(f) for f in files if Path(f).is_file() or Path(f).is_dir()]
    for parent in parents:
        try:
            client, _ = connect(parent.uri, None, **parent.http)
            if metrics:
                log_metrics(client, parent.run_id, {k: float(v) for k, v in metrics.items()}, int(time.time() * 1000))
            for path in files:
                if path.is_dir():
                    client.log_artifacts(parent.run_id, str(path), path.name)
                else:
                    client.log_artifact(parent.run_id, str(path))
            client.set_tag(parent.run_id, "fedcore.status", status)
            client.set_terminated(parent.run_id, STATUS.get(status, "FINISHED"))
        except Exception as err:  # noqa: BLE001 - every run's own results are logged already
            log.warning("MLflow tracking at %s: the parent run %s was not closed (%s)", parent.uri, parent.run_id,
                        error_line(err, typed=False, limit=300))


def outcome(statuses: Sequence[str]) -> tuple[str, dict[str, float]]:
    """A parent's status and summary metrics from its runs' statuses."""
    done = sum(s == "completed" for s in statuses)
    return ("completed" if done == len(statuses) else "failed",
            {"runs": len(statuses), "completed": done, "failed": len(statuses) - done})


class SweepCallback(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): under Hydra's basic launcher, the jobs of a
    multirun nest under one ``sweep`` run per experiment, opened when its first job starts (jobs run one
    after another in this process) and closed when the multirun ends. Other launchers nest their jobs
    themselves (the Dask launcher) or not at all."""

    def __init__(self) -> None:
        self.parents: dict[tuple[str, str], Optional[ParentRun]] = {}
        self.statuses: list[str] = []
        self.sweep_dir: Optional[str] = None
        self.nested = False

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.parents, self.statuses = {}, []
        self.sweep_dir = str(_select(config, "hydra.sweep.dir") or "")

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        os.environ.pop(PARENT_ENV, None)
        self.nested = False
        basic = str(_select(config, "hydra.launcher._target_") or "").endswith("BasicLauncher")
        if self.sweep_dir is None or not basic:
            return
        try:
            from omegaconf import OmegaConf

            plain = OmegaConf.to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]),
                                           resolve=True)
            label = plain.get("model_name") or _select(config, "hydra.runtime.choices.model")
            target = tracking_target(plain, label)
        except Exception:  # noqa: BLE001 - the job reports its own configuration errors
            return
        if target is None or (plain.get("tracking") or {}).get("parent_run_id"):
            return
        uri, experiment, http = target
        if (uri, experiment) not in self.parents:
            name = f"sweep {Path(self.sweep_dir).name}" if self.sweep_dir else "sweep"
            self.parents[(uri, experiment)] = _open(uri, experiment, http, name, "sweep", None,
                                                    {"fedcore.sweep_dir": self.sweep_dir})
        parent = self.parents[(uri, experiment)]
        if parent is not None:
            os.environ[PARENT_ENV] = parent.run_id
            self.nested = True

    def on_job_end(self, config: Any, job_return: Any = None, **kwargs: Any) -> None:
        os.environ.pop(PARENT_ENV, None)
        if self.nested:
            status = getattr(getattr(job_return, "status", None), "name", "COMPLETED")
            self.statuses.append("completed" if status == "COMPLETED" else "failed")
        self.nested = False

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        parents = [p for p in self.parents.values() if p is not None]
        if parents:
            status, metrics = outcome(self.statuses)
            sweep = Path(self.sweep_dir or ".")
            close_parents(parents, status, metrics, [sweep / n for n in SWEEP_FILES])
        self.parents, self.sweep_dir = {}, None


def _select(config: Any, key: str) -> Any:
    try:
        from omegaconf import OmegaConf

        return OmegaConf.select(config, key, default=None)
    except Exception:  # noqa: BLE001
        return None
