"""Setup schema: common options, the node config base, and the ordered chain.

Node config classes live beside their apply functions (``nodes/``) and are
found through the registry by their ``kind``, so this module knows no node.
"""
from __future__ import annotations

import math
import typing
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, nearest
from .fedcore_format import native_setup
from .registry import get_node

PositiveInt = Optional[int]
Auto = Union[bool, Literal["auto"]]


def searchable(low: Any = None, high: Any = None, *, choices: Optional[list] = None, log: bool = False,
               step: Optional[float] = None, type: Optional[str] = None, default: bool = True,
               as_list: bool = False, if_set: bool = False) -> dict:
    """``json_schema_extra`` marking a node config field as searchable by ``fedcore-adapter search``.

    ``low``/``high`` (and ``log``, ``step``) give a numeric range, ``choices`` a categorical one (a bool or
    Literal field without them: all its values); ``step``: a grid, so that values drawn repeat and trials
    start from the chain prefixes earlier trials computed (``step: null`` in ``search.space`` searches the
    range continuously); ``type`` (float, int, categorical) when the annotation does
    not tell; ``default=False``: declared but searched only when the search's ``space`` names the field;
    ``as_list``: the field is a list and a candidate holds the one value searched (e.g. ``[0.9]``);
    ``if_set``: searched only where the field holds a value (an optional field whose alternative is another
    field, e.g. a budget's ``ratio`` or ``value``).
    """
    spec = {"low": low, "high": high, "choices": choices, "log": log or None, "step": step, "type": type,
            "default": default, "list": as_list or None, "if_set": if_set or None}
    return {"search": {k: v for k, v in spec.items() if v is not None}}


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown fields (a typo fails at load time)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EarlyStopping(StrictModel):
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0)


class TrainParams(StrictModel):
    """Options of the shared training loop (training node and every fine-tune)."""

    epochs: int = Field(1, ge=0, json_schema_extra=searchable(1, 20, default=False))
    learning_rate: float = Field(1e-3, gt=0, json_schema_extra=searchable(1e-4, 1e-2, log=True, default=False))
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["none", "cosine"] = "none"
    grad_clip: Optional[float] = Field(None, gt=0)
    custom_loss: Optional[Any] = Field(
        None, description="import path of a loss class/function, or a {_target_: ...} mapping"
    )
    early_stopping: Optional[EarlyStopping] = None
    limit_train_batches: PositiveInt = Field(None, ge=1)
    limit_valid_batches: PositiveInt = Field(None, ge=1)
    progress: bool = True
    unlabeled_loss: Literal["mse", "cosine"] = Field(
        "mse", description="what unlabeled batches learn from the teacher: mse of the outputs (padded tokens "
                           "left out), or cosine: 1 - cosine of each sample's output, per-token outputs mean-pooled "
                           "over the attention_mask first (a sentence embedding's cosine)")
    unlabeled_mse_weight: float = Field(0.0, ge=0, description="with unlabeled_loss cosine: plus this weight "
                                                               "times the output mse")
    # recovery fine-tunes (pruning, low-rank): see trainer.train
    distill: Auto = Field(False, description="on labeled batches also distil from the model as it entered the "
                                             "node; auto: in the fine-tunes of compression nodes only")
    distill_weight: float = Field(0.5, ge=0, le=1, description="loss = (1 - w) task + w distillation")
    temperature: float = Field(4.0, gt=0, description="softmax temperature of the soft targets")
    keep_best: Auto = Field("auto", description="true: end on the best validation epoch, the starting weights "
                                                "included; auto (fine-tunes of compression nodes only): restore the "
                                                "starting weights when they score higher than the last epoch")

    @model_validator(mode="after")
    def _mse_weight_needs_cosine(self) -> "TrainParams":
        if self.unlabeled_mse_weight and self.unlabeled_loss != "cosine":
            raise ValueError(f"unlabeled_mse_weight adds the output mse to unlabeled_loss cosine; with "
                             f"unlabeled_loss {self.unlabeled_loss} leave it 0 (got {self.unlabeled_mse_weight})")
        return self

    @field_validator("distill", "keep_best", mode="before")
    @classmethod
    def _auto_or_bool(cls, v: Any, info) -> Any:
        text = str(v).lower() if isinstance(v, (str, bool)) else None
        if text not in ("auto", "true", "false"):
            raise ValueError(f"{info.field_name} must be auto, true or false (got {v!r})")
        return "auto" if text == "auto" else text == "true"


class CommonConfig(StrictModel):
    """Options shared by every node of a setup."""

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    seed: int = 42
    save_each: int = Field(-1, description="checkpoint every N epochs inside training nodes; -1: at node end")
    limit_train_batches: PositiveInt = Field(None, ge=1)
    limit_valid_batches: PositiveInt = Field(None, ge=1)
    limit_test_batches: PositiveInt = Field(None, ge=1)
    measure: bool = Field(True, description="measure the model after every node")
    num_threads: PositiveInt = Field(None, ge=1, description="torch threads while measuring latency")
    latency_warmup: int = Field(3, ge=0)
    latency_repeats: int = Field(20, ge=1)
    distributed_compression: bool = False
    # quick runs: applied to every node when the setup is validated (see Setup._quick_run), then cleared
    epochs_scale: Optional[float] = Field(None, gt=0, description="multiply every epoch count of every node "
                                          "(training, fine-tunes, QAT, distillation...; rounded up, at least 1)")
    max_epochs: PositiveInt = Field(None, ge=1, description="cap every epoch count of every node")
    limit_batches: PositiveInt = Field(None, ge=1, description="cap every batch count: train, validation, test "
                                       "and calibration batches of every node and of the measurements")

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be one of auto, cpu, cuda, cuda:N (got {v!r})")

    @field_validator("save_each")
    @classmethod
    def _check_save_each(cls, v: int) -> int:
        if v == -1 or v >= 1:
            return v
        raise ValueError(f"save_each must be -1 (end of node only) or a positive epoch count (got {v})")


class NodeConfig(StrictModel):
    """Base of every node config: a ``kind`` literal plus the node's own fields."""

    kind: str
    name: Optional[str] = Field(None, description="display name; defaults to the kind")

    # Chain contract, read by Setup's whole-chain validation (never by the engine):
    trains_float_weights: ClassVar[bool] = False  # needs a float (trainable) model as input
    produces_int8: ClassVar[bool] = False  # its output is an int8-converted model

    @property
    def label(self) -> str:
        return self.name or self.kind


def _tagged(models: list[type], tag: Any) -> Optional[type]:
    """The member of a tagged choice (``Field(discriminator=...)``) whose ``Literal`` tag field is ``tag``."""
    return next((m for m in models for f in m.model_fields.values()
                 if typing.get_origin(f.annotation) is Literal and typing.get_args(f.annotation) == (tag,)), None)


def _model_at(model: type, loc: tuple) -> Optional[type]:
    """The pydantic model holding the field at ``loc`` (``Optional[...]`` fields looked through, a tagged
    choice's member picked by the tag pydantic puts in ``loc``), if any."""
    parts = list(loc[:-1])
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return None
        inner = [a for a in (typing.get_args(field.annotation) or (field.annotation,))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return None
        member = _tagged(inner, parts[0]) if len(inner) > 1 and parts else None
        if member is not None:
            parts.pop(0)
        model = member or inner[0]
    return model


def validation_message(prefix: str, err: ValidationError, model: Optional[type] = None) -> str:
    """A pydantic error as one line: ``<prefix>.<field> = <value>: <why>``; an unknown field lists the fields
    ``model`` (the class validated) allows at that place."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    value = first.get("input")
    where = f"{prefix}.{loc}" if loc else prefix
    message = first["msg"].removeprefix("Value error, ")  # a validator's own sentence, without pydantic's label
    owner = _model_at(model, first["loc"]) if model is not None and first["type"] == "extra_forbidden" else None
    if owner is not None:
        allowed = sorted(owner.model_fields)
        message = f"unknown field{nearest(first['loc'][-1], allowed)}; allowed: {', '.join(allowed)}"
    return f"{where} = {value!r}: {message}"


def validate_node(index: int, data: Any) -> NodeConfig:
    """Validate one node mapping by its ``kind``; errors name the index, field and value."""
    if isinstance(data, NodeConfig):
        return data
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError(f"nodes[{index}]: each node must be a mapping with a 'kind' (got {data!r})")
    spec = get_node(str(data["kind"]))
    try:
        return spec.config_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_message(f"nodes[{index}] ({data['kind']})", err, spec.config_cls)) from None


def _shorten(model: BaseModel, scale: Optional[float], cap: Optional[int], limit: Optional[int]) -> None:
    """Scale / cap every positive ``epochs`` and cap every set ``*batches`` count of ``model`` and its sub-models."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _shorten(value, scale, cap, limit)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, BaseModel):
                    _shorten(item, scale, cap, limit)
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            continue
        elif name == "epochs":
            epochs = max(1, math.ceil(value * scale)) if scale is not None else value
            epochs = min(epochs, cap) if cap is not None else epochs
            if epochs != value:
                setattr(model, name, epochs)
        elif name.endswith("batches") and limit is not None and value > limit:
            setattr(model, name, limit)


class Setup(StrictModel):
    """A named, ordered chain of nodes with common options."""

    name: str = "custom"
    description: str = ""
    common: CommonConfig = Field(default_factory=CommonConfig)
    nodes: list[Any] = Field(default_factory=list)

    @field_validator("nodes", mode="before")
    @classmethod
    def _validate_nodes(cls, v: Any) -> list[NodeConfig]:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"nodes must be a list of node mappings (got {type(v).__name__})")
        return [validate_node(i, n) for i, n in enumerate(v)]

    @model_validator(mode="after")
    def _validate_chain(self) -> "Setup":
        if not self.nodes:
            raise ConfigError(f"setup {self.name!r} has no nodes; add at least one under 'nodes'")
        converted_at = None
        for i, node in enumerate(self.nodes):
            if converted_at is not None and node.trains_float_weights:
                chain = " -> ".join(n.kind for n in self.nodes)
                raise ConfigError(
                    f"setup {self.name!r}: nodes[{i}] ({node.kind}) trains float weights but follows "
                    f"nodes[{converted_at}] ({self.nodes[converted_at].kind}), which converts the model to int8; "
                    f"move int8 conversion to the end of the chain ({chain})"
                )
            if node.produces_int8:
                converted_at = i
        return self

    @model_validator(mode="after")
    def _quick_run(self) -> "Setup":
        """``common.epochs_scale`` / ``max_epochs`` / ``limit_batches`` written into every node's fields (every
        ``epochs`` and every ``*batches`` count, nested fine-tunes included), then cleared so that the setup
        as it runs re-validates to itself."""
        common = self.common
        scale, cap, limit = common.epochs_scale, common.max_epochs, common.limit_batches
        if scale is None and cap is None and limit is None:
            return self
        for i, node in enumerate(self.nodes):
            self.nodes[i] = node = node.model_copy(deep=True)
            _shorten(node, scale, cap, limit)
        if limit is not None:
            for name in ("limit_train_batches", "limit_valid_batches", "limit_test_batches"):
                setattr(common, name, min(getattr(common, name) or limit, limit))
        common.epochs_scale = common.max_epochs = common.limit_batches = None
        return self

    @classmethod
    def parse(cls, data: Any) -> "Setup":
        """Validate a native or FedCore-format mapping into a Setup (one-line ConfigError on failure)."""
        if isinstance(data, Setup):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"a setup must be a mapping (got {type(data).__name__})")
        data = native_setup(data)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(validation_message(f"setup {data.get('name', 'custom')!r}", err, cls)) from None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")
