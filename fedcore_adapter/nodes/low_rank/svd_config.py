"""Options of the ``svd`` low-rank method: truncated SVD of each weight (FedCore's ``low_rank_model``)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from ...schema import StrictModel, TrainParams, searchable
from .budget import Budget
from .rank_strategies import STRATEGIES

Strategy = Literal["energy", "explained_variance", "quantile", "rank", "rank_ratio", "params_ratio"]
assert set(Strategy.__args__) == set(STRATEGIES)


class SVDMethod(StrictModel):
    """Each layer's rank from its singular values (``spectrum_pruning_strategy`` at each of ``thresholds``), or
    all ranks together from a ``budget``; optionally FedCore's regularised ``U, S, Vh`` training first."""

    name: Literal["svd"] = "svd"
    spectrum_pruning_strategy: Strategy = "energy"
    thresholds: list[float] = Field(default_factory=lambda: [0.9], min_length=1,
                                    description="strategy thresholds (FedCore: energy_thresholds); several -> "
                                                "each is tried and the smallest model within selection_tolerance wins",
                                    json_schema_extra=searchable(0.5, 0.99, step=0.01, type="float", as_list=True))
    rank: Optional[int] = Field(None, ge=1, description="fixed rank for spectrum_pruning_strategy='rank'")
    budget: Optional[Budget] = Field(None, description="global target; replaces the per-layer strategy")
    decomposing_mode: Literal["channel", "spatial"] = "channel"
    selection_tolerance: float = Field(0.01, ge=0, description="accuracy points (or relative loss) a smaller "
                                                               "candidate may lose when several thresholds are given")
    # FedCore's regularised training of U, S, Vh before truncation
    epochs: int = Field(0, ge=0, description="epochs of U,S,Vh training with the Hoyer and orthogonality losses")
    learning_rate: float = Field(1e-3, gt=0, description="learning rate of the U,S,Vh training")
    hoyer_loss: float = Field(0.2, ge=0, description="weight of the Hoyer sparsity loss on S")
    orthogonal_loss: float = Field(5.0, ge=0, description="weight of the orthogonality loss on U and Vh")

    @field_validator("thresholds")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        bad = [t for t in v if not 0 < t <= 1]
        if bad:
            raise ValueError(f"every threshold must be in (0, 1] (got {bad[0]})")
        return v

    @model_validator(mode="after")
    def _strategy_needs(self) -> "SVDMethod":
        strategy = self.spectrum_pruning_strategy
        if strategy == "params_ratio" and any(t >= 1 for t in self.thresholds):
            raise ValueError(f"params_ratio thresholds must be in (0, 1) (got {max(self.thresholds)})")
        if strategy == "rank" and self.rank is None and self.budget is None:
            raise ValueError("spectrum_pruning_strategy='rank' needs rank: <int>")
        return self

    def train_params(self, finetune: TrainParams) -> TrainParams:
        """The U,S,Vh training: distils as the ``finetune`` does, never falls back to its start (keep_best off)."""
        return TrainParams(epochs=self.epochs, learning_rate=self.learning_rate, progress=finetune.progress,
                           distill=finetune.distill, distill_weight=finetune.distill_weight,
                           temperature=finetune.temperature, keep_best=False)
