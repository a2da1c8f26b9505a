"""Options of the ``falor`` low-rank method: activation-aware factorisation (ptdeco's falor), no training.

What the rank search bounds (``metric``) and how the factors are fitted (``fit``) are each a choice with its own
options, so an option that only one choice reads cannot be given to the other::

    method: {name: falor, metric: {name: cosine, threshold: 0.02},
             fit: {name: sequential, weighting: gradient, refit_kept: true}}

A bare name (``metric: cosine``, ``fit: sequential``) takes that choice's defaults.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from ...schema import StrictModel, searchable
from .budget import Budget

DEFAULT_NSR = 0.01  # ptdeco's default bound on the model-output noise-to-signal ratio


def named(value: Any) -> Any:
    """A bare choice name (``'cosine'``) as the mapping ``{'name': 'cosine'}``."""
    return {"name": value} if isinstance(value, str) else value


class NSR(StrictModel):
    """The model-output noise-to-signal ratio (and optionally ptdeco's symmetric KL of its softmax)."""

    name: Literal["nsr"] = "nsr"
    threshold: Optional[float] = Field(None, gt=0, description="per_layer: largest NSR with one layer changed; "
                                                               "global: bound on their sum. Default 0.01 (none "
                                                               "with a budget)",
                                       json_schema_extra=searchable(1e-3, 0.1, log=True, if_set=True))
    kl_threshold: Optional[float] = Field(None, gt=0, description="optional bound on symmetric KL of output softmax")

    @property
    def bound(self) -> float:
        return DEFAULT_NSR if self.threshold is None else self.threshold


class Cosine(StrictModel):
    """``1 - mean cosine`` of per-sample outputs (e.g. mean-pooled sentence embeddings)."""

    name: Literal["cosine"] = "cosine"
    threshold: Optional[float] = Field(None, gt=0, lt=1, description="per_layer: bound on 1 - mean cosine with "
                                                                     "one layer changed; global: on their sum",
                                       json_schema_extra=searchable(1e-3, 0.1, log=True, if_set=True))

    @property
    def bound(self) -> Optional[float]:
        return self.threshold


class Projection(StrictModel):
    """Each layer's weight projected on its own output eigenvectors (ptdeco)."""

    name: Literal["projection"] = "projection"


class Sequential(StrictModel):
    """Layers fitted in forward order to the original's outputs from the compressed model's inputs (closed form,
    corrects accumulated error, bias refitted)."""

    name: Literal["sequential"] = "sequential"
    damping: float = Field(0.1, gt=0, description="ridge towards the original weight, relative to the mean input "
                                                  "variance")
    weighting: Literal["none", "gradient"] = Field(
        "none", description="none (plain output error) or gradient (each layer's output error weighted by the "
                            "Gauss-Newton metric of the model's output; FWSVD with the full matrix)")
    probes: int = Field(8, ge=1, description="weighting='gradient': random probes per calibration batch")
    refit_kept: bool = Field(False, description="the searched layers left at full rank are refitted too (same "
                                                "shape, no parameter added)")


Metric = Annotated[Union[NSR, Cosine], Field(discriminator="name")]
Fit = Annotated[Union[Projection, Sequential], Field(discriminator="name")]


class FalorMethod(StrictModel):
    """Each Linear / 1x1 conv projected on the top eigenvectors of its outputs; ranks searched on the model's
    output (``metric``), per layer or globally, or meeting a ``budget``."""

    name: Literal["falor"] = "falor"
    metric: Metric = Field(default_factory=NSR, description="what the rank search bounds: nsr or cosine")
    allocation: Literal["per_layer", "global"] = Field(
        "per_layer", description="per_layer: ptdeco's rule, each layer alone under the metric's threshold; global: "
                                 "ranks with the fewest params whose per-layer losses sum to under it")
    budget: Optional[Budget] = Field(None, description="global target (with allocation='global'); replaces the "
                                                       "metric's threshold")
    grid_points: int = Field(8, ge=2, description="global allocation: ranks measured per layer")
    statistic: Literal["second_moment", "covariance"] = Field(
        "second_moment", description="eigenvectors of E[y y^T] (keeps the mean output; least output error) "
                                     "or of the centred covariance (ptdeco's use_mean=True)")
    metric_batches: int = Field(1, ge=1, description="calibration batches the metric is measured on")
    fit: Fit = Field(default_factory=Projection, description="projection or sequential")

    @field_validator("metric", "fit", mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return named(v)

    @model_validator(mode="after")
    def _budget_or_threshold(self) -> "FalorMethod":
        if self.budget is not None:
            if self.allocation != "global":
                raise ValueError("budget with method='falor' needs allocation='global' (per_layer bounds each layer "
                                 "alone)")
            given = "threshold" if self.metric.threshold is not None else \
                "kl_threshold" if getattr(self.metric, "kl_threshold", None) is not None else None
            if given:
                raise ValueError(f"give budget or metric.{given}, not both (the budget replaces the loss threshold)")
        elif isinstance(self.metric, Cosine) and self.metric.threshold is None:
            raise ValueError("metric 'cosine' needs threshold: <bound on 1 - mean cosine> (or a budget)")
        return self
