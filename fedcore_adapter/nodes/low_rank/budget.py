"""``budget``: a whole-model target (params or MACs) that either low-rank method may meet instead of a per-layer
rule (:mod:`.allocation` turns it into ranks)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from ...schema import StrictModel, searchable


class Budget(StrictModel):
    """A whole-model target: ``ratio`` of the current total, or an absolute ``value``."""

    metric: Literal["params", "macs"] = "params"
    ratio: Optional[float] = Field(None, gt=0, le=1, description="target total / current total",
                                   json_schema_extra=searchable(0.2, 0.95, step=0.05, type="float", if_set=True))
    value: Optional[int] = Field(None, ge=1, description="target total (absolute count)")

    @model_validator(mode="after")
    def _one_target(self) -> "Budget":
        if (self.ratio is None) == (self.value is None):
            raise ValueError("give exactly one of ratio (fraction of the current total) or value (absolute count)")
        return self
