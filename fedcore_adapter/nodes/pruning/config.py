"""Configs of the ``pruning`` and ``unstructured_pruning`` nodes, and the FedCore names they accept.

FedCore's ``pruning_model`` parameters map onto these fields (in a
``model_validator(mode="before")``):

- ``importance='MagnitudeImportance'`` (and ``TaylorImportance``, ``LAMPImportance``,
  ``BNScaleImportance``, ``RandomImportance``) -> ``importance='magnitude'`` ...
- ``pruner_name``: ``'magnitude_pruner'`` / ``'meta_pruner'`` -> plain pruning;
  ``'batch_norm_pruner'`` -> ``importance='bn_scale'`` plus an L1 penalty on
  BatchNorm scales while fine-tuning (``bn_sparsity``, network slimming).
- ``epochs`` / ``learning_rate``: fine-tuning after each of the
  ``pruning_iterations`` steps. When ``finetune_params`` is given, ``epochs``
  applies between steps and ``finetune_params`` (``epochs``, ``custom_loss``...,
  its learning rate defaulting to the node's) is the final fine-tune after the
  last step. So ``pruning_iterations=5, epochs=5, finetune_params={'epochs': 10}``
  fine-tunes 5 epochs after steps 1-4 and 10 epochs after step 5.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from ...schema import NodeConfig, TrainParams, searchable
from ..toolkit import inherit_finetune

IMPORTANCES = ("magnitude", "taylor", "lamp", "bn_scale", "random", "obs")
UNSTRUCTURED_IMPORTANCES = ("magnitude", "taylor", "random")
SCHEDULES = ("linear", "cubic", "cosine")

_FEDCORE_IMPORTANCE = {
    "magnitudeimportance": "magnitude", "magnitude": "magnitude", "l1": "magnitude", "l2": "magnitude",
    "taylorimportance": "taylor", "taylor": "taylor",
    "lampimportance": "lamp", "lamp": "lamp",
    "bnscaleimportance": "bn_scale", "bn_scale": "bn_scale", "bnscale": "bn_scale",
    "randomimportance": "random", "random": "random",
    "obs": "obs",
}
_FEDCORE_PRUNERS = {"magnitude_pruner": None, "meta_pruner": None, "batch_norm_pruner": "bn_scale"}
_SCHEDULE_ALIASES = {"agp": "cubic"}


_FEDCORE_NAME = {"magnitude": "MagnitudeImportance", "taylor": "TaylorImportance", "lamp": "LAMPImportance",
                 "bn_scale": "BNScaleImportance", "random": "RandomImportance"}


def _importance_name(value: Any, allowed: tuple[str, ...]) -> Any:
    if not isinstance(value, str):
        return value
    name = _FEDCORE_IMPORTANCE.get(value.lower(), value)
    if name not in allowed:
        raise ValueError(f"unknown importance {value!r}; valid: {', '.join(allowed)} "
                         f"(or FedCore's {', '.join(_FEDCORE_NAME[a] for a in allowed if a in _FEDCORE_NAME)})")
    return name


def _check_pruner_name(value: Optional[str], allowed: dict) -> Optional[str]:
    if value is not None and value not in allowed:
        raise ValueError(f"unknown pruner_name {value!r}; valid: {', '.join(allowed)}")
    return value


def _check_ratio(value: float, what: str) -> float:
    if not 0 <= value < 1:
        raise ValueError(f"{what} must be in [0, 1) (got {value})")
    return value


class _FinetuneFields(NodeConfig):
    """Iterations and fine-tuning shared by both pruning kinds (see the module docstring)."""

    pruning_iterations: int = Field(1, ge=1, description="pruning steps; the ratio is reached at the last one",
                                    json_schema_extra=searchable(1, 5, default=False))
    epochs: int = Field(0, ge=0, description="fine-tune epochs after each step (between steps if finetune_params)",
                        json_schema_extra=searchable(0, 10, default=False))
    learning_rate: float = Field(1e-3, gt=0, description="learning rate of the fine-tunes after each step")
    finetune_params: Optional[TrainParams] = Field(None, description="final fine-tune after the last step")
    pruner_name: Optional[str] = Field(None, description="FedCore pruner name (see the module docstring)")
    calibration_batches: Optional[int] = Field(
        None, ge=1, description="training batches for Taylor gradients and for reconstruct; default "
                                "common.limit_valid_batches, else 16")
    ignored_layers: list[str] = Field(
        default_factory=list, description="module names never pruned; structured pruning always keeps the layers "
                                          "producing the model's output (the final classifier)")

    trains_float_weights: ClassVar[bool] = True

    def step_params(self, last: bool) -> TrainParams:
        """Fine-tune options after a pruning step (``last``: after the final one)."""
        if last and self.finetune_params is not None:
            return self.finetune_params
        base = self.finetune_params or TrainParams()
        return base.model_copy(update={"epochs": self.epochs, "learning_rate": self.learning_rate})

    def total_finetune_epochs(self) -> int:
        return sum(self.step_params(i == self.pruning_iterations - 1).epochs for i in range(self.pruning_iterations))


class PruningConfig(_FinetuneFields):
    """Structured pruning (FedCore ``pruning_model``): channels, neurons and heads are removed for real."""

    kind: Literal["pruning"] = "pruning"
    pruning_ratio: Union[float, dict[str, float]] = Field(
        0.5, description="fraction of channels removed per layer group; a dict {layer name: ratio} prunes only those",
        json_schema_extra=searchable(0.1, 0.9, step=0.05, type="float"))
    head_pruning_ratio: Optional[float] = Field(
        None, description="transformers: fraction of attention heads removed; default pruning_ratio")
    importance: Literal[IMPORTANCES] = Field(  # type: ignore[valid-type]
        "magnitude", json_schema_extra=searchable(choices=["magnitude", "lamp", "taylor"]),
        description="channel ranking; 'obs' (with reconstruct): the output error each unit's removal leaves "
                    "after the re-fit")
    reconstruct: bool = Field(
        False, json_schema_extra=searchable(),
        description="after removing channels / heads, re-fit each layer that read them (Linear, Conv1d, Conv2d) "
                    "by least squares so its outputs on calibration_batches of training data match the model's "
                    "before the step (layer by layer, no training)")
    importance_norm: float = Field(2.0, gt=0, description="p of the Lp norm for magnitude and LAMP")
    global_pruning: bool = Field(False, description="rank channels across layers instead of per layer")
    round_to: Optional[int] = Field(None, ge=1, description="keep channel counts a multiple of this")
    bn_sparsity: float = Field(0.0, ge=0, description="L1 penalty on BatchNorm scales during fine-tunes")
    schedule: Literal["linear", "geometric"] = Field(
        "linear", json_schema_extra=searchable(default=False),
        description="ratio after each of pruning_iterations: linear (torch-pruning's equal shares of the "
                    "original channels) or geometric (the same fraction of the remaining channels each "
                    "step, so the last step cuts least)")
    sensitivity_ratios: Optional[list[float]] = Field(
        None, description="measure each layer group's sensitivity at these ratios first (sensitivity.json)")

    @model_validator(mode="before")
    @classmethod
    def _fedcore_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("pruner_name"), str) and _FEDCORE_PRUNERS.get(data["pruner_name"]) == "bn_scale":
            data.setdefault("importance", "bn_scale")
            data.setdefault("bn_sparsity", 1e-4)
        return inherit_finetune(data)

    @field_validator("pruner_name")
    @classmethod
    def _known_pruner(cls, v: Optional[str]) -> Optional[str]:
        return _check_pruner_name(v, _FEDCORE_PRUNERS)

    @field_validator("importance", mode="before")
    @classmethod
    def _importance_alias(cls, v: Any) -> Any:
        return _importance_name(v, IMPORTANCES)

    @field_validator("pruning_ratio")
    @classmethod
    def _ratio_range(cls, v: Union[float, dict[str, float]]) -> Union[float, dict[str, float]]:
        if isinstance(v, dict):
            if not v:
                raise ValueError("pruning_ratio as a dict must name at least one layer")
            return {name: _check_ratio(r, f"pruning_ratio[{name!r}]") for name, r in v.items()}
        return _check_ratio(v, "pruning_ratio")

    @field_validator("head_pruning_ratio")
    @classmethod
    def _head_ratio_range(cls, v: Optional[float]) -> Optional[float]:
        return v if v is None else _check_ratio(v, "head_pruning_ratio")

    @model_validator(mode="after")
    def _head_ratio_needs_one_ratio(self) -> "PruningConfig":
        if self.head_pruning_ratio is not None and isinstance(self.pruning_ratio, dict):
            raise ValueError(f"head_pruning_ratio = {self.head_pruning_ratio} applies only with one pruning_ratio for "
                             f"the whole model; with pruning_ratio as a dict, give the attention layers' ratios in it")
        return self

    @model_validator(mode="after")
    def _obs_needs_reconstruct(self) -> "PruningConfig":
        if self.importance == "obs":
            if not self.reconstruct:
                raise ValueError("importance 'obs' ranks units by the error left after the least-squares re-fit; "
                                 "it needs reconstruct: true")
            if self.global_pruning:
                raise ValueError("importance 'obs' chooses units block by block; it cannot rank them across "
                                 "layers (global_pruning: true); use global_pruning: false or another importance")
            if self.sensitivity_ratios:
                raise ValueError("sensitivity_ratios measure each layer group on its own, which importance 'obs' "
                                 "(block by block after re-fits) cannot; use another importance for them")
        return self

    @field_validator("sensitivity_ratios")
    @classmethod
    def _sensitivity_range(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        return v if v is None else [_check_ratio(r, "sensitivity_ratios") for r in v]


class UnstructuredPruningConfig(_FinetuneFields):
    """Unstructured sparsity: weights set to zero (dense kernels, so size and latency do not fall)."""

    kind: Literal["unstructured_pruning"] = "unstructured_pruning"
    sparsity: float = Field(0.5, description="fraction of weights set to zero, in [0, 1)",
                            json_schema_extra=searchable(0.1, 0.95, step=0.05))
    importance: Literal[UNSTRUCTURED_IMPORTANCES] = "magnitude"  # type: ignore[valid-type]
    global_pruning: bool = Field(True, description="one threshold across layers; False: the same sparsity per layer")
    schedule: Literal[SCHEDULES] = Field("cubic", description="sparsity across iterations: linear, cubic (AGP), cosine")  # type: ignore[valid-type]
    sparse_format: bool = Field(False, description="store the checkpoint as sparse CSR tensors where that saves bytes")

    @model_validator(mode="before")
    @classmethod
    def _fedcore_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "pruning_ratio" in data:
            if "sparsity" in data:
                raise ValueError("give sparsity or pruning_ratio (its FedCore name), not both")
            data["sparsity"] = data.pop("pruning_ratio")
        if isinstance(data.get("schedule"), str):
            data["schedule"] = _SCHEDULE_ALIASES.get(data["schedule"].lower(), data["schedule"].lower())
        return inherit_finetune(data)

    @field_validator("pruner_name")
    @classmethod
    def _known_pruner(cls, v: Optional[str]) -> Optional[str]:
        return _check_pruner_name(v, {"magnitude_pruner": None, "meta_pruner": None})

    @field_validator("importance", mode="before")
    @classmethod
    def _importance_alias(cls, v: Any) -> Any:
        return _importance_name(v, UNSTRUCTURED_IMPORTANCES)

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, v: float) -> float:
        return _check_ratio(v, "sparsity")
