"""Configs of the quantization nodes: ``ptq_dynamic``, ``ptq_static`` and ``qat``.

FedCore names are accepted: ``post_dynamic_quant(epochs, allow_conv, allow_emb)``,
``post_training_quant(epochs)`` and ``training_aware_quant(epochs)`` are
converted by ``fedcore_format`` into these kinds with their parameters as given.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import Field, field_validator, model_validator

from ...schema import NodeConfig, StrictModel, TrainParams, searchable

Backend = Literal["x86", "fbgemm", "onednn", "qnnpack"]
GraphMode = Literal["auto", "fx", "eager"]
Observer = Literal["minmax", "moving_average", "histogram", "percentile"]

# Spellings of the one supported dtype (FedCore and torch users write these).
_INT8_ALIASES = {"int8", "qint8", "quint8", "torch.qint8", "torch.quint8", "torch.int8"}


class AutoSkip(StrictModel):
    """Keep the most quantization-sensitive layers in float until the output error fits the budget."""

    error_budget: float = Field(0.01, gt=0, description="largest accepted relative output error "
                                                          "||y_q - y||^2 / ||y||^2 of the whole quantized model")
    max_float_layers: Optional[int] = Field(None, ge=0, description="never keep more layers than this in float")
    batches: int = Field(2, ge=1, description="batches of calibration data the errors are measured on")


class QuantConfigBase(NodeConfig):
    """Options every quantization node shares."""

    dtype: Literal["int8"] = Field("int8", description="weight dtype (int8 kernels only)")
    backend: Backend = Field("x86", description="torch quantized engine whose int8 kernels run the model")
    per_channel: bool = Field(True, description="one weight scale per output channel (else per tensor)",
                              json_schema_extra=searchable(default=False))
    skip: list[str] = Field(default_factory=list, description="fnmatch patterns of layer names kept in float")
    auto_skip: Optional[AutoSkip] = Field(None, description="keep the most sensitive layers in float automatically")
    export: bool = Field(False, description="also write a torch.export archive (model.pt2: core aten ops, int8 "
                                            "weights and int8 GEMMs; loads with torch alone) beside the checkpoint")
    produces_int8: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _fedcore_names(cls, data: Any) -> Any:
        """Map FedCore/torch spellings: ``dtype='qint8'`` or ``torch.qint8`` mean int8."""
        if isinstance(data, dict) and "dtype" in data and str(data["dtype"]).lower() in _INT8_ALIASES:
            data = {**data, "dtype": "int8"}
        return data


class PTQDynamicConfig(QuantConfigBase):
    """Dynamic post-training quantization (FedCore ``post_dynamic_quant``): int8 weights,
    activations quantized on the fly; no calibration data needed unless ``smooth_alpha`` is set."""

    kind: Literal["ptq_dynamic"] = "ptq_dynamic"
    allow_conv: bool = Field(False, description="also quantize Conv1d/Conv2d with groups=1 (BatchNorm folded in, "
                                                "a following ReLU fused): input quantized per call, int8 conv kernel; "
                                                "other convs stay float, named in the metrics row's note",
                             json_schema_extra=searchable())
    allow_emb: bool = Field(False, description="also quantize Embedding/EmbeddingBag weights (int8 per row; "
                                               "subclasses too where their eval forward is a plain lookup)")
    allow_rnn: bool = Field(True, description="also quantize GRU/LSTM layers (torch's int8 recurrent kernels; "
                                              "LSTMs with proj_size stay float, named in the metrics row's note)")
    activation_range: Literal["auto", "reduced"] = Field(
        "auto", description="auto: 8-bit activations on CPUs with VNNI, 7-bit elsewhere; reduced: always 7-bit")
    smooth_alpha: Optional[float] = Field(
        None, ge=0, le=1, description="SmoothQuant: move activation outliers into the weights with this strength")
    smooth_min_gain: float = Field(10.0, ge=1, description="smooth a Linear only where that divides its own int8 "
                                                          "output error at least this many times")
    calibration_batches: Optional[int] = Field(None, ge=1, description="batches for smoothing statistics and "
                                                                       "auto_skip; default: limit_valid_batches")
    epochs: Optional[int] = Field(None, ge=0, description="FedCore parameter; dynamic quantization trains nothing")


class PTQStaticConfig(QuantConfigBase):
    """Static post-training quantization (FedCore ``post_training_quant``): activation ranges
    calibrated on validation batches, int8 from layer to layer (conv+bn+relu fused)."""

    kind: Literal["ptq_static"] = "ptq_static"
    observer: Observer = Field("histogram", description="how activation ranges are estimated",
                               json_schema_extra=searchable(choices=["minmax", "histogram", "percentile"]))
    percentile: float = Field(99.99, gt=50, le=100, description="kept share of activations for observer=percentile")
    calibration_batches: Optional[int] = Field(None, ge=1, description="default: the setup's limit_valid_batches")
    epochs: int = Field(1, ge=1, description="passes over the calibration batches (FedCore name)")
    graph_mode: GraphMode = Field("auto", description="fx: traced graph, fused and int8 between layers; eager: "
                                                     "each layer quantized on its own; auto: fx if traceable")


class QATConfig(TrainParams, QuantConfigBase):
    """Quantization-aware training (FedCore ``training_aware_quant``): fake-quant training for
    ``epochs`` with the shared loop, then conversion to a real int8 model."""

    kind: Literal["qat"] = "qat"
    epochs: int = Field(1, description="fake-quant training epochs (at least 1)",
                        json_schema_extra=searchable(1, 10, default=False))
    learning_rate: float = Field(1e-4, gt=0)
    learnable_scales: bool = Field(False, description="LSQ: learn scales by back-propagation after calibration",
                                   json_schema_extra=searchable())
    calibration_batches: int = Field(4, ge=1, description="batches that initialise learnable scales")
    scale_lr_factor: float = Field(0.01, gt=0, le=1, description="learnable scales train at this times learning_rate")
    freeze_bn_after: Optional[int] = Field(None, ge=1, description="freeze BatchNorm statistics after this epoch")
    graph_mode: GraphMode = "auto"
    trains_float_weights: ClassVar[bool] = True

    @field_validator("epochs")
    @classmethod
    def _at_least_one_epoch(cls, v: int) -> int:
        if v < 1:
            raise ValueError("QAT needs at least 1 training epoch; use ptq_static to quantize without training")
        return v
