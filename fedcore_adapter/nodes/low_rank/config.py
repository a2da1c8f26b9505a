"""``low_rank`` node configuration (FedCore ``low_rank_model``), accepting FedCore's parameter names."""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import Field, field_validator, model_validator

from ...schema import NodeConfig, StrictModel, TrainParams
from ..toolkit import inherit_finetune
from .rank_strategies import STRATEGIES

Strategy = Literal["energy", "explained_variance", "quantile", "rank", "rank_ratio", "params_ratio"]
LayerType = Literal["linear", "conv", "embedding"]
assert set(Strategy.__args__) == set(STRATEGIES)

# Strategies whose ``thresholds`` are fractions in (0, 1], and those in (0, 1).
_UNIT_INTERVAL = {"energy", "explained_variance", "quantile", "rank_ratio"}


class Budget(StrictModel):
    """A whole-model target: ``ratio`` of the current total, or an absolute ``value``."""

    metric: Literal["params", "macs"] = "params"
    ratio: Optional[float] = Field(None, gt=0, le=1, description="target total / current total")
    value: Optional[int] = Field(None, ge=1, description="target total (absolute count)")

    @model_validator(mode="after")
    def _one_target(self) -> "Budget":
        if (self.ratio is None) == (self.value is None):
            raise ValueError("give exactly one of ratio (fraction of the current total) or value (absolute count)")
        return self


class LowRankConfig(NodeConfig):
    """Truncated-SVD (optionally FedCore-regularised) or activation-aware (falor) factorisation."""

    kind: Literal["low_rank"] = "low_rank"
    method: Literal["svd", "falor"] = Field("svd", description="svd: weight spectrum; falor: output covariance")
    spectrum_pruning_strategy: Strategy = "energy"
    thresholds: list[float] = Field(default_factory=lambda: [0.9], min_length=1,
                                    description="strategy thresholds (FedCore: energy_thresholds); several -> "
                                                "each is tried and the smallest model within selection_tolerance wins")
    rank: Optional[int] = Field(None, ge=1, description="fixed rank for spectrum_pruning_strategy='rank'")
    budget: Optional[Budget] = Field(None, description="global target; replaces the per-layer strategy (svd) or "
                                                       "the loss threshold of the global allocation (falor)")
    decomposing_mode: Literal["channel", "spatial"] = "channel"
    layer_types: list[LayerType] = Field(default_factory=lambda: ["linear", "conv", "embedding"], min_length=1)
    include: Optional[list[str]] = Field(None, description="shell patterns of layer names to consider")
    exclude: list[str] = Field(default_factory=list, description="shell patterns of layer names to skip")
    selection_tolerance: float = Field(0.01, ge=0, description="accuracy points (or relative loss) a smaller "
                                                               "candidate may lose when several thresholds are given")
    calibration_batches: Optional[int] = Field(None, ge=1, description="default: common.limit_valid_batches")
    # FedCore's regularised training of U, S, Vh before truncation (svd method)
    epochs: int = Field(0, ge=0, description="epochs of U,S,Vh training with the Hoyer and orthogonality losses")
    learning_rate: float = Field(1e-3, gt=0)
    hoyer_loss: float = Field(0.2, ge=0, description="weight of the Hoyer sparsity loss on S")
    orthogonal_loss: float = Field(5.0, ge=0, description="weight of the orthogonality loss on U and Vh")
    finetune_params: TrainParams = Field(default_factory=lambda: TrainParams(epochs=0))
    # activation-aware (falor) decomposition
    nsr_threshold: float = Field(0.01, gt=0, description="per_layer: largest model-output noise-to-signal ratio "
                                                         "with one layer changed; global: budget for their sum")
    allocation: Literal["per_layer", "global"] = Field(
        "per_layer", description="per_layer: ptdeco's rule, each layer alone under nsr_threshold; global: ranks "
                                 "with the fewest params whose per-layer NSRs sum to under nsr_threshold")
    grid_points: int = Field(8, ge=2, description="global allocation: ranks measured per layer")
    falor_statistic: Literal["second_moment", "covariance"] = Field(
        "second_moment", description="eigenvectors of E[y y^T] (keeps the mean output; least output error) "
                                     "or of the centred covariance (ptdeco's use_mean=True)")
    kl_threshold: Optional[float] = Field(None, gt=0, description="optional bound on symmetric KL of output softmax")
    metric_batches: int = Field(1, ge=1, description="calibration batches the NSR is measured on")
    falor_metric: Literal["nsr", "cosine"] = Field(
        "nsr", description="what the rank search bounds: nsr (model-output noise-to-signal ratio, nsr_threshold) "
                           "or cosine (1 - mean cosine of per-sample outputs, e.g. mean-pooled sentence "
                           "embeddings; cosine_loss_threshold)")
    cosine_loss_threshold: Optional[float] = Field(None, gt=0, lt=1, description="falor_metric='cosine': bound "
                                                   "on 1 - mean cosine (per_layer) or on its sum (global)")
    falor_fit: Literal["projection", "sequential"] = Field(
        "projection", description="projection: each layer's weight on its own output eigenvectors (ptdeco); "
                                  "sequential: layers fitted in forward order to the original's outputs from "
                                  "the compressed model's inputs (closed form, corrects accumulated error, "
                                  "bias refitted)")
    falor_damping: float = Field(0.1, gt=0, description="sequential fit: ridge towards the original weight, "
                                                        "relative to the mean input variance")
    falor_weighting: Literal["none", "gradient"] = Field(
        "none", description="sequential fit: none (plain output error) or gradient (each layer's output error "
                            "weighted by the Gauss-Newton metric of the model's output, E[g g^T] with g the gradient "
                            "of a random projection of the metric output; FWSVD with the full matrix)")
    falor_probes: int = Field(8, ge=1, description="falor_weighting='gradient': random probes per calibration batch")
    falor_refit_kept: bool = Field(False, description="sequential fit: the searched layers left at full rank are "
                                                      "refitted too (ridge least squares to the original outputs from "
                                                      "the compressed inputs; same shape, no parameter added)")

    trains_float_weights: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _fedcore_names(cls, data: Any) -> Any:
        """Map FedCore's names (energy_thresholds, threshold) and let finetune inherit learning_rate."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "energy_thresholds" in data:
            if "thresholds" in data:
                raise ValueError("give thresholds or energy_thresholds (FedCore's name), not both")
            data["thresholds"] = data.pop("energy_thresholds")
        if "threshold" in data:
            if "thresholds" in data:
                raise ValueError("give threshold or thresholds, not both")
            data["thresholds"] = [data.pop("threshold")]
        if isinstance(data.get("thresholds"), (int, float)):
            data["thresholds"] = [data["thresholds"]]
        return inherit_finetune(data)

    @field_validator("thresholds")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        bad = [t for t in v if not 0 < t <= 1]
        if bad:
            raise ValueError(f"every threshold must be in (0, 1] (got {bad[0]})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "LowRankConfig":
        strategy = self.spectrum_pruning_strategy
        if strategy == "params_ratio" and any(t >= 1 for t in self.thresholds):
            raise ValueError(f"params_ratio thresholds must be in (0, 1) (got {max(self.thresholds)})")
        if strategy == "rank" and self.rank is None and self.budget is None and self.method == "svd":
            raise ValueError("spectrum_pruning_strategy='rank' needs rank: <int>")
        if self.method == "falor" and self.budget is not None:
            if self.allocation != "global":
                raise ValueError("budget with method='falor' needs allocation='global' (per_layer bounds each layer "
                                 "alone)")
            given = [f for f in ("nsr_threshold", "cosine_loss_threshold", "kl_threshold")
                     if f in self.model_fields_set and getattr(self, f) is not None]
            if given:
                raise ValueError(f"give budget or {given[0]}, not both (with method='falor' the budget replaces the "
                                 f"loss threshold)")
        if self.falor_metric == "cosine" and self.cosine_loss_threshold is None and self.budget is None:
            raise ValueError("falor_metric='cosine' needs cosine_loss_threshold: <bound on 1 - mean cosine> "
                             "(or a budget)")
        if self.falor_metric == "nsr" and self.cosine_loss_threshold is not None:
            raise ValueError("cosine_loss_threshold works with falor_metric='cosine' only")
        if self.falor_metric == "cosine" and self.kl_threshold is not None:
            raise ValueError("kl_threshold works with falor_metric='nsr' only")
        if self.falor_refit_kept and self.falor_fit != "sequential":
            raise ValueError(f"falor_refit_kept works with falor_fit='sequential' only (got falor_fit={self.falor_fit!r})")
        if self.falor_weighting != "none" and self.falor_fit != "sequential":
            raise ValueError(f"falor_weighting={self.falor_weighting!r} works with falor_fit='sequential' only "
                             f"(got falor_fit={self.falor_fit!r})")
        if self.method == "falor" and self.epochs:
            raise ValueError("epochs (regularised U,S,Vh training) works with method='svd' only; "
                             "use finetune_params to train after falor")
        return self

    def train_params(self) -> TrainParams:
        """Options of the regularised U,S,Vh training phase."""
        return TrainParams(epochs=self.epochs, learning_rate=self.learning_rate, progress=self.finetune_params.progress)
