"""``low_rank`` node configuration (FedCore ``low_rank_model``): which layers, the fine-tune, and the method.

The method is one of two, each with its own options (so an option of one cannot be given to the other)::

    - kind: low_rank
      layer_types: [linear]
      method: {name: svd, spectrum_pruning_strategy: energy, thresholds: [0.9]}   # svd_config.SVDMethod
    - kind: low_rank
      method: {name: falor, metric: {name: nsr, threshold: 0.01}}                 # falor_config.FalorMethod

``method: falor`` (a bare name) takes the method's defaults; no method is ``svd``. Hydra reaches every option,
e.g. ``nodes.low_rank.method.budget.value=20000000``.

The flat form (every option on the node, as FedCore's ``low_rank_model`` and setups written before the
methods had their own options) is converted by :func:`from_flat`, the one place that knows the old names
(:func:`to_flat` writes them back for FedCore-format users).
"""
from __future__ import annotations

import copy
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from ...schema import NodeConfig, TrainParams
from ..toolkit import inherit_finetune
from .budget import Budget
from .falor_config import FalorMethod, named
from .svd_config import SVDMethod

LayerType = Literal["linear", "conv", "embedding"]
Method = Annotated[Union[SVDMethod, FalorMethod], Field(discriminator="name")]

# flat (old) option -> its path under ``method``, per method
_FLAT_SVD = {k: (k,) for k in ("spectrum_pruning_strategy", "thresholds", "rank", "decomposing_mode",
                                "selection_tolerance", "epochs", "learning_rate", "hoyer_loss", "orthogonal_loss")}
_FLAT_FALOR = {
    "falor_metric": ("metric", "name"), "nsr_threshold": ("metric", "threshold"),
    "cosine_loss_threshold": ("metric", "threshold"), "kl_threshold": ("metric", "kl_threshold"),
    "allocation": ("allocation",), "grid_points": ("grid_points",), "falor_statistic": ("statistic",),
    "metric_batches": ("metric_batches",), "falor_fit": ("fit", "name"), "falor_damping": ("fit", "damping"),
    "falor_weighting": ("fit", "weighting"), "falor_probes": ("fit", "probes"),
    "falor_refit_kept": ("fit", "refit_kept"),
}
_FLAT_BOTH = {"budget": ("budget",)}
_FEDCORE_THRESHOLDS = ("energy_thresholds", "threshold")  # FedCore's names of ``thresholds``
FLAT_KEYS = frozenset(_FLAT_SVD) | frozenset(_FLAT_FALOR) | frozenset(_FLAT_BOTH) | frozenset(_FEDCORE_THRESHOLDS)


def _put(method: dict, path: tuple[str, ...], value: Any, flat_key: str) -> None:
    """``method[path] = value``, a bare choice name at ``path[0]`` expanded; the same key given twice is an error."""
    target = method
    for part in path[:-1]:
        target[part] = named(target.get(part, {}))
        if not isinstance(target[part], dict):
            return  # left for the model to reject with its own message
        target = target[part]
    if path[-1] in target and target[path[-1]] != value:
        raise ValueError(f"{flat_key} = {value!r} (the flat form) and method.{'.'.join(path)} = "
                         f"{target[path[-1]]!r} both given; give it once, under method")
    target[path[-1]] = value


def _thresholds(data: dict) -> dict:
    """FedCore's ``energy_thresholds`` / ``threshold`` as ``thresholds``, one number as a list."""
    for old in _FEDCORE_THRESHOLDS:
        if old in data:
            if "thresholds" in data:
                raise ValueError(f"give thresholds or {old} (FedCore's name), not both")
            value = data.pop(old)
            data["thresholds"] = value if old == "energy_thresholds" else [value]
    if isinstance(data.get("thresholds"), (int, float)):
        data["thresholds"] = [data["thresholds"]]
    return data


def _choice(method: dict, part: str, flat_name: Optional[str], default: str) -> str:
    """The name of ``method[part]`` (``metric`` / ``fit``): the flat option's, else the nested one's, else default."""
    current = named(method.get(part, {}))
    if isinstance(current, dict):
        name = current.get("name") or flat_name or default
        method[part] = {**current, "name": name}
        return name
    return flat_name or default


def _falor_choices(method: dict, options: dict) -> None:
    """Flat falor options as old setups had them: a threshold or fit option the chosen metric / fit does not
    read is an error where it changed the result (as before), else dropped (it was ignored)."""
    for key, allowed in (("falor_metric", ("nsr", "cosine")), ("falor_fit", ("projection", "sequential"))):
        if key in options and options[key] not in allowed:
            raise ValueError(f"{key} = {options[key]!r}: allowed {allowed[0]!r} or {allowed[1]!r}")
    metric = _choice(method, "metric", options.pop("falor_metric", None), "nsr")
    if options.get("budget") is not None or method.get("budget") is not None:
        given = [k for k in ("nsr_threshold", "cosine_loss_threshold", "kl_threshold") if options.get(k) is not None]
        if given:
            raise ValueError(f"give budget or {given[0]}, not both (with method='falor' the budget replaces the loss "
                             f"threshold)")
    elif metric == "cosine" and "cosine_loss_threshold" not in options and "threshold" not in method["metric"]:
        raise ValueError("falor_metric='cosine' needs cosine_loss_threshold: <bound on 1 - mean cosine> (or a budget)")
    if metric == "nsr" and "cosine_loss_threshold" in options:
        raise ValueError("cosine_loss_threshold works with falor_metric='cosine' only")
    if metric == "cosine":
        if options.get("kl_threshold") is not None:
            raise ValueError("kl_threshold works with falor_metric='nsr' only")
        options.pop("kl_threshold", None)
        options.pop("nsr_threshold", None)
    fit = _choice(method, "fit", options.pop("falor_fit", None), "projection")
    if fit != "sequential":
        if options.get("falor_refit_kept"):
            raise ValueError(f"falor_refit_kept works with falor_fit='sequential' only (got falor_fit={fit!r})")
        if options.get("falor_weighting", "none") != "none":
            raise ValueError(f"falor_weighting={options['falor_weighting']!r} works with falor_fit='sequential' only "
                             f"(got falor_fit={fit!r})")
        for key in ("falor_refit_kept", "falor_weighting", "falor_damping", "falor_probes"):
            options.pop(key, None)


def from_flat(data: dict) -> dict:
    """A node mapping with its method's options given flat (the old form, FedCore's names included) in the
    ``method`` form. Old semantics kept: the fine-tune inherits the node's ``learning_rate``; ``falor_metric``
    says which threshold (``nsr_threshold`` / ``cosine_loss_threshold``) bounds the search."""
    flat = FLAT_KEYS & set(data)
    if not flat:
        return data
    data = _thresholds(inherit_finetune(dict(data)))
    method = named(copy.deepcopy(data.pop("method", "svd")))
    if not isinstance(method, dict):
        return {**data, "method": method}  # not a method: the model says what is allowed
    name = method.setdefault("name", "svd")
    options = {k: data.pop(k) for k in list(data) if k in FLAT_KEYS}
    if name == "falor":
        options.pop("learning_rate", None)  # falor trains nothing: the node's rate only ever reached the fine-tune
        if options.get("epochs"):
            raise ValueError("epochs (regularised U,S,Vh training) works with method='svd' only; "
                             "use finetune_params to train after falor")
        options.pop("epochs", None)
        _falor_choices(method, options)
        paths = {**_FLAT_FALOR, **_FLAT_BOTH}
    else:
        paths = {**_FLAT_SVD, **_FLAT_BOTH}
    for key, value in options.items():
        if key not in paths:
            raise ValueError(f"{key} is an option of method "
                             f"{'falor' if key in _FLAT_FALOR else 'svd'!r}, not of {name!r}")
        _put(method, paths[key], value, key)
    return {**data, "method": method}


def to_flat(data: dict) -> dict:
    """A node mapping in the ``method`` form with its options flat, under the old (FedCore) names: what
    FedCore-format users edit (``params['low_rank_model']['epochs'] = 5``). Inverse of :func:`from_flat`."""
    method = named(copy.deepcopy(data.get("method", "svd")))
    if not isinstance(method, dict):
        return data
    flat = {k: v for k, v in data.items() if k != "method"}
    name = method.pop("name", "svd")
    flat["method"] = name
    paths = {**(_FLAT_FALOR if name == "falor" else _FLAT_SVD), **_FLAT_BOTH}
    metric = named(method.get("metric", {})) if name == "falor" else {}
    by_path = {path: key for key, path in paths.items()
               if key != ("cosine_loss_threshold" if metric.get("name", "nsr") == "nsr" else "nsr_threshold")}
    for part, value in method.items():
        inner = named(value) if part in ("metric", "fit") and name == "falor" else None
        for sub, v in (inner.items() if isinstance(inner, dict) else [(None, value)]):
            path = (part,) if sub is None else (part, sub)
            if path not in by_path:
                raise ValueError(f"method.{'.'.join(path)} has no flat (FedCore) name")
            flat[by_path[path]] = v
    return flat


class LowRankConfig(NodeConfig):
    """Low-rank factorisation of the chosen layers by truncated SVD or activation-aware (falor) projection."""

    kind: Literal["low_rank"] = "low_rank"
    method: Method = Field(default_factory=SVDMethod, description="svd: weight spectrum; falor: output covariance")
    layer_types: list[LayerType] = Field(default_factory=lambda: ["linear", "conv", "embedding"], min_length=1)
    include: Optional[list[str]] = Field(None, description="shell patterns of layer names to consider")
    exclude: list[str] = Field(default_factory=list, description="shell patterns of layer names to skip")
    calibration_batches: Optional[int] = Field(None, ge=1, description="default: common.limit_valid_batches")
    finetune_params: TrainParams = Field(default_factory=lambda: TrainParams(epochs=0))

    trains_float_weights: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _flat_form(cls, data: Any) -> Any:
        return from_flat(data) if isinstance(data, dict) else data

    @field_validator("method", mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return named(v)

    @classmethod
    def to_fedcore(cls, params: dict) -> dict:
        """``params`` (a raw node mapping) as FedCore's flat ``low_rank_model`` parameters."""
        return to_flat(params)


__all__ = ["Budget", "FalorMethod", "LowRankConfig", "SVDMethod", "from_flat", "to_flat"]
