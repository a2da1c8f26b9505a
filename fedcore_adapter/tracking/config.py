"""The ``tracking`` config group: which store, which experiment, what to log (no mlflow import here)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from pydantic import Field, ValidationError

from ..errors import ConfigError
from ..resources import conf_dir
from ..schema import StrictModel, validation_message

DEFAULT_DB = "mlflow.db"
DEFAULT_EXPERIMENT = "fedcore_adapter"


class TrackingConfig(StrictModel):
    """Options of ``conf/tracking/mlflow.yaml``; every field can be overridden as ``tracking.<field>=...``."""

    name: Literal["mlflow", "none"] = "mlflow"
    uri: Optional[str] = Field(None, description="null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the "
                                                 "working directory (what `mlflow ui` opens there)")
    experiment: Optional[str] = Field(None, description="null: '<model> on <data>' (config names, or the "
                                                        "_target_'s name for a custom model or data)")
    run_name: Optional[str] = Field(None, description="null: '<SETUP> · <model> · seed=<seed>' and the setup's "
                                                      "overrides; ' #2', ' #3'... when the experiment has it already")
    parent_run_id: Optional[str] = Field(None, description="nest the setup run under this run (a sweep's or a "
                                                           "search's; set by the sweep launchers)")
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


def target_name(spec: Any) -> Optional[str]:
    """The last dotted part of a config section's ``_target_`` (``my_pkg.build_model`` -> ``build_model``)."""
    target = spec.get("_target_") if isinstance(spec, Mapping) else None
    return str(target).rsplit(".", 1)[-1] if target and target != "???" else None


def _choice(section: str, spec: Any) -> Optional[str]:
    """The name of the ``conf/<section>/*.yaml`` option with the same ``_target_`` (``custom`` never counts)."""
    target = spec.get("_target_") if isinstance(spec, Mapping) else None
    if not target:
        return None
    for path in sorted((conf_dir() / section).glob("*.yaml")):
        if path.stem != "custom" and f"_target_: {target}\n" in path.read_text():
            return path.stem
    return None


def model_label(config: Optional[Mapping[str, Any]], label: Optional[str] = None) -> str:
    """What to call the model: ``label`` (``model_name`` or the config choice) unless it is ``custom``, else
    the matching config option, else the ``_target_``'s name, else ``model``."""
    model = (config or {}).get("model")
    if label and label != "custom":
        return str(label)
    return _choice("model", model) or target_name(model) or "model"


def data_label(config: Optional[Mapping[str, Any]]) -> Optional[str]:
    data = (config or {}).get("data")
    return _choice("data", data) or target_name(data)


def default_experiment(config: Optional[Mapping[str, Any]], model_name: Optional[str]) -> str:
    """``<model> on <data>`` (see :func:`model_label`), ``<model>`` without a data config, else ``fedcore_adapter``."""
    model = model_label(config, model_name)
    data = data_label(config)
    if model == "model" and not data:
        return DEFAULT_EXPERIMENT
    return f"{model} on {data}" if data else model
