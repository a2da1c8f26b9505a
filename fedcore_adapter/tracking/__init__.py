"""MLflow tracking (the only package importing mlflow, and only when a run is tracked).

    hook = hook_from_config({"name": "mlflow", "uri": None}, config, model_name)   # the CLI's entry point
    run_setup(setup, model, dm, hooks=[MlflowHook(uri="http://127.0.0.1:5000", experiment="mnist1d")])
    model = load_logged_model(run_id, build_original_model(), tracking_uri=...)
    sync_pending("composition_results/TEST")        # send what a run could not log

The default store is ``sqlite:///mlflow.db`` in the working directory, the one
``mlflow ui`` opens when started there.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from .config import TrackingConfig, default_experiment, model_label, parse_tracking_config, resolve_uri
from .hook import MlflowHook
from .journal import PENDING_FILE, sync_pending
from .store import fetch_runs as _fetch_runs
from .store import load_logged_model as _load_logged_model

__all__ = ["MlflowHook", "TrackingConfig", "hook_from_config", "load_logged_model", "fetch_runs", "sync_pending",
           "PENDING_FILE", "resolve_uri"]


def hook_from_config(tracking_cfg: Mapping[str, Any] | None, config: Optional[Mapping[str, Any]] = None,
                     model_name: Optional[str] = None) -> Optional[MlflowHook]:
    """The hook for the composed ``tracking`` group; None for ``tracking=none``.

    ``tracking.experiment`` defaults to ``<model> on <data>`` (``model_name``, else the config choice or
    the ``_target_``'s name), so runs of every setup on one model and data land in one experiment.
    """
    cfg = parse_tracking_config(tracking_cfg)
    if cfg.name == "none":
        return None

    experiment = cfg.experiment or default_experiment(config, model_name)
    hook = MlflowHook(cfg.model_copy(update={"experiment": experiment}))
    hook.model_label = model_label(config, model_name)
    return hook


def load_logged_model(run_id: str, base_model, tracking_uri: Optional[str] = None, artifact_path: str = "model"):
    """The final model a tracked run logged, rebuilt on a freshly built original ``base_model``."""
    return _load_logged_model(run_id, base_model, tracking_uri, artifact_path)


def fetch_runs(tracking_uri: Optional[str] = None, experiment: Optional[str] = None) -> list[dict]:
    """Setup runs of a tracking store as plain summaries (``run_id``, ``setup``, ``status``, ``rows``)."""
    return _fetch_runs(tracking_uri, experiment)
