"""The MLflow parent run of a search: its trials' runs nest under it (tag ``mlflow.parentRunId``), the front
and the trials table are its artifacts."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .config import parse_tracking_config, resolve_uri
from .records import flatten

log = logging.getLogger("fedcore_adapter")


class SearchRun:
    """``start()`` opens the parent run (or reopens ``run_id`` on resume); ``trial_tracking()`` is the ``tracking``
    mapping that nests a trial's run under it; ``finish()`` logs the results and closes it. Tracking failures
    are logged, never fatal."""

    def __init__(self, tracking: Mapping[str, Any], experiment: str, name: str):
        self.cfg = parse_tracking_config(tracking)
        self.uri = resolve_uri(self.cfg.uri)
        self.experiment, self.name = experiment, name
        self.run_id: Optional[str] = None
        self.client = None

    def start(self, params: Mapping[str, Any], run_id: Optional[str] = None) -> Optional[str]:
        try:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(self.uri)
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
            if run_id:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return run_id
            run = self.client.create_run(exp_id, run_name=self.name,
                                         tags={"fedcore.role": "search", "fedcore.status": "running", **self.cfg.tags})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in flatten(dict(params)).items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        except Exception as err:  # noqa: BLE001 - tracking never fails the search
            log.warning("search tracking off: %s", " ".join(str(err).split())[:200])
            self.run_id = None
        return self.run_id

    def trial_tracking(self, run_name: str) -> dict:
        tags = {**self.cfg.tags, "mlflow.parentRunId": self.run_id} if self.run_id else dict(self.cfg.tags)
        return {**self.cfg.model_dump(), "experiment": self.experiment, "run_name": run_name, "tags": tags}

    def finish(self, metrics: Mapping[str, float], files: Sequence[Path], status: str = "completed") -> None:
        if not self.run_id or self.client is None:
            return
        try:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.client.log_metric(self.run_id, key, float(value))
            for path in files:
                if Path(path).is_file():
                    self.client.log_artifact(self.run_id, str(path))
                elif Path(path).is_dir():
                    self.client.log_artifacts(self.run_id, str(path), Path(path).name)
            self.client.set_tag(self.run_id, "fedcore.status", status)
            self.client.set_terminated(self.run_id, "FINISHED" if status == "completed" else "FAILED")
        except Exception as err:  # noqa: BLE001
            log.warning("search tracking: could not log the results: %s", " ".join(str(err).split())[:200])
