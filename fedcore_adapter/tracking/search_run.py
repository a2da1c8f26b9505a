"""The MLflow parent run of a search (:mod:`.parents`, role ``search``): its trials' runs nest under it
(``tracking.parent_run_id``), the front and the trials table are its artifacts."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .config import parse_tracking_config
from .parents import ParentRun, close_parents, open_parents, reopen_parent


class SearchRun:
    """``start()`` opens the parent run (or reopens ``run_id`` on resume); ``trial_tracking()`` is the ``tracking``
    mapping that nests a trial's run under it; ``finish()`` logs the results and closes it. Tracking failures
    are logged, never fatal (the trials then log unnested)."""

    def __init__(self, tracking: Mapping[str, Any], experiment: str, name: str):
        tracking = dict(tracking)
        self.above = tracking.pop("parent_run_id", None)  # a run the search itself nests under
        self.tracking = {**tracking, "experiment": experiment}
        self.name = name
        self.parent: Optional[ParentRun] = None

    @property
    def run_id(self) -> Optional[str]:
        return self.parent.run_id if self.parent else None

    def start(self, params: Mapping[str, Any], run_id: Optional[str] = None) -> Optional[str]:
        cfg = {"tracking": dict(self.tracking)}
        if run_id:
            self.parent = reopen_parent(cfg, run_id)
        else:
            tags = {**parse_tracking_config(self.tracking).tags,
                    **({"mlflow.parentRunId": self.above} if self.above else {})}
            opened = open_parents([cfg], name=self.name, role="search", params=params, tags=tags)
            self.parent = opened[0] if opened else None
        return self.run_id

    def trial_tracking(self, run_name: str) -> dict:
        return {**self.tracking, "run_name": run_name, **({"parent_run_id": self.run_id} if self.run_id else {})}

    def finish(self, metrics: Mapping[str, float], files: Sequence[Path], status: str = "completed") -> None:
        if self.parent is not None:
            close_parents([self.parent], status, {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                          files)
