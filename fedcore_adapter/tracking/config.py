"""The ``tracking`` config group: which store, which experiment, what to log (no mlflow import here)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from pydantic import Field, ValidationError

from ..errors import ConfigError
from ..schema import StrictModel, validation_message

DEFAULT_DB = "mlflow.db"
DEFAULT_EXPERIMENT = "fedcore_adapter"


class TrackingConfig(StrictModel):
    """Options of ``conf/tracking/mlflow.yaml``; every field can be overridden as ``tracking.<field>=...``."""

    name: Literal["mlflow", "none"] = "mlflow"
    uri: Optional[str] = Field(None, description="null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the "
                                                 "working directory (what `mlflow ui` opens there)")
    experiment: Optional[str] = Field(None, description="null: the model name")
    run_name: Optional[str] = Field(None, description="null: the results folder name (<SETUP>_<model_name>)")
    log_model: bool = True
    tags: dict[str, str] = Field(default_factory=dict)
    flush_timeout_s: float = Field(120.0, gt=0, description="end of run: wait this long for logging to finish")
    http_timeout_s: float = Field(10.0, gt=0, description="per HTTP request to a tracking server")
    http_retries: int = Field(2, ge=0, le=10, description="HTTP retries per request to a tracking server")


def parse_tracking_config(data: Mapping[str, Any] | TrackingConfig | None) -> TrackingConfig:
    """Validate the ``tracking`` mapping; a bad field is one ConfigError line naming ``tracking.<field>``."""
    if isinstance(data, TrackingConfig):
        return data
    try:
        return TrackingConfig.model_validate(dict(data or {}))
    except ValidationError as err:
        raise ConfigError(validation_message("tracking", err, TrackingConfig)) from None


def resolve_uri(uri: Optional[str]) -> str:
    """The store URI to log to; relative local paths become absolute (the working directory of now)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(Path.cwd() / uri[len('sqlite:///'):]).resolve()}"
    elif uri.startswith((".", "/", "~")):  # a local path (e.g. a ./mlruns file store)
        uri = str(Path(uri).expanduser().resolve())
    return uri


def default_experiment(config: Optional[Mapping[str, Any]], model_name: Optional[str]) -> str:
    """The model name, else the model's ``_target_`` class name, else ``fedcore_adapter``."""
    if model_name:
        return str(model_name)
    model = (config or {}).get("model")
    target = model.get("_target_") if isinstance(model, Mapping) else None
    if target and target != "???":
        return str(target).rsplit(".", 1)[-1]
    return DEFAULT_EXPERIMENT
