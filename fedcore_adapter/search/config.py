"""The ``search`` config section: trials, objectives, the quality constraint (accuracy by default), the space and
the moves."""
from __future__ import annotations

import math
from typing import Any, Literal, Mapping, Optional, Union

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from ..errors import ConfigError
from ..results import METRIC_COLUMNS
from ..registry import known_kinds
from ..schema import StrictModel, validation_message

AUTO_MARGIN_UNKNOWN = 0.02  # early_stop.margin auto without the validation split's size
# metric column -> direction (the metrics rows of ``metrics.measure``)
OBJECTIVES = {"macs": "minimize", "params": "minimize", "size_mb": "minimize", "latency_ms": "minimize",
              "latency_ms_per_sample": "minimize", "throughput_sps": "maximize", "accuracy": "maximize",
              "loss": "minimize"}
# the measured columns that are not a quality (costs and facts of the measurement, the loss: lower is better)
QUALITY_EXCLUDED = tuple(c for c in (*METRIC_COLUMNS, "runtime", "threads", "batch_shape") if c != "accuracy")


def standard_error(accuracy: float, samples: int) -> float:
    """The standard error of an accuracy measured on ``samples`` samples, sqrt(p(1-p)/n)."""
    p = min(max(float(accuracy), 0.0), 1.0)
    return math.sqrt(p * (1 - p) / samples)


class Moves(StrictModel):
    """Chain moves from the initial assumption (each candidate chain is at most ``depth`` moves away)."""

    drop: bool = Field(True, description="drop one compression node")
    insert: list[str] = Field(default_factory=lambda: ["ptq_static", "distillation"],
                              description="node kinds that may be inserted (one of each, where the chain rules allow)")
    reorder: bool = Field(True, description="swap two neighbouring compression nodes where the chain rules allow")
    depth: int = Field(1, ge=0, le=3, description="moves combined per candidate chain")


class EarlyStop(StrictModel):
    """Stop a trial whose model, as a node hands it on, is below the accuracy constraint (an infeasible trial is
    dominated); and, with ``within_nodes``, inside a node one that cannot recover above it: accuracy dips and recovers
    (each pruning step, then the fine-tune), so an epoch's accuracy is judged with the most that any node of the
    same kind and length finished in this search gained from that epoch to its end."""

    enabled: bool = True
    margin: Union[Literal["auto"], float] = Field(
        "auto", description="stop only this far below the constraint line (validation accuracy of the node's last "
                            "epoch; auto: twice the standard error of the reference's validation accuracy, "
                            "sqrt(p(1-p)/n), and at least half the constraint), ...")
    patience: int = Field(0, ge=0, description="... after this many more node ends without improvement "
                                               "(0: at the first node end below)")
    within_nodes: Literal["off", "final_phase", "phase_ends", "all"] = Field(
        "off", description="also stop inside a node, at the second epoch in a row whose accuracy plus the largest "
                           "recovery seen from that epoch (finished nodes of the same kind and epochs) ends below "
                           "the line less margin: in every epoch (all; true), or only in the node's last training "
                           "phase (final_phase: the fine-tune after its last pruning step or truncation, where "
                           "no structural step dips the accuracy); off (false) by default")

    @field_validator("margin", mode="before")
    @classmethod
    def _auto_or_accuracy(cls, value: Any) -> Any:
        if value == "auto":
            return value
        try:
            number = float(value) if not isinstance(value, bool) else -1.0
        except (TypeError, ValueError):
            number = -1.0
        if not number >= 0:
            raise ValueError(f"margin must be auto or an accuracy >= 0 (got {value!r})")
        return number

    @field_validator("within_nodes", mode="before")
    @classmethod
    def _bool_within(cls, value: Any) -> Any:
        return {True: "all", False: "off"}.get(value, value) if isinstance(value, bool) else value

    min_curves: int = Field(3, ge=1, description="finished nodes of the same kind and epochs needed before a "
                                                 "node is judged inside")
    recovered_by: list[str] = Field(
        default_factory=lambda: ["distillation"],
        description="node kinds that recover accuracy: a node end one of them follows is judged with the largest "
                    "gain from its entry to its end that finished nodes of that kind (of at least its epochs) showed "
                    "from an entry below the line less margin, min_curves of them, and not judged before that; "
                    "[]: judged as every node end")

    @field_validator("recovered_by")
    @classmethod
    def _node_kinds(cls, v: list[str]) -> list[str]:
        unknown = [kind for kind in v if kind not in known_kinds()]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))}: not a node kind; kinds: "
                             f"{', '.join(known_kinds())}")
        return v


class SearchConfig(StrictModel):
    """``search.*`` of ``conf/search.yaml``; see the README's Search section."""

    trials: int = Field(32, description="finished trials wanted (completed or stopped early)")
    quality: str = Field("accuracy", description="the metric the constraint is on, measured on the validation split "
                                                 "like accuracy, higher better: accuracy, or a quality column the "
                                                 "model's own validation step logs (a ptls CoLESModule's "
                                                 "recall_top_k, a torchmetrics F1...); a share in [0, 1] per "
                                                 "sample: its standard error is bounded by sqrt(p(1-p)/n)")
    objectives: list[str] = Field(default_factory=lambda: ["macs", "accuracy"], min_length=1)
    max_accuracy_drop: Optional[float] = Field(0.01, ge=0, le=1, description="constraint: the quality metric "
                                                                             "(quality: accuracy) at most this "
                                                                             "below the uncompressed model's")
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = 0
    prefix: Union[Literal["auto"], int] = Field("auto", description="leading nodes shared by every trial, run once "
                                                                    "(auto: the leading training nodes)")
    share_prefix: bool = Field(True, description="start trials from cached checkpoints of computed prefixes")
    share_training: bool = Field(True, description="restore a training equal to one an earlier trial ran (the same "
                                                   "input weights, options and random state; e.g. a low-rank node's "
                                                   "U,S,Vh training when only its thresholds differ) instead of "
                                                   "running it again (prefix/training/ of the results folder)")
    training_cache_mb: float = Field(2048, gt=0, description="disk the restorable trainings may take; beyond it "
                                                             "those used longest ago are removed")
    space: dict[str, Any] = Field(default_factory=dict, description="<kind or node index>: {<field>: spec or "
                                                                    "false}; spec: low, high, log, step, choices")
    moves: Moves = Field(default_factory=Moves)
    insert_templates: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"ptq_static": {"calibration_batches": 8},
                                 "distillation": {"epochs": {"low": 3, "high": 30, "step": 3}, "kl_weight": 1.0,
                                                  "task_weight": 1.0}},
        description="node fields of an inserted kind; a field given as a range ({low, high, step} or "
                    "{choices}) is searched over it")
    early_stop: EarlyStop = Field(default_factory=EarlyStop)
    reuse: float = Field(0.9, ge=0, le=1, description="share of the trials after the sampler's start-up ones that "
                                                      "continue a feasible front trial: its chain and the nodes "
                                                      "before those reuse_redraw re-draws fixed (a computed "
                                                      "prefix, not run again), the re-drawn nodes' fields drawn "
                                                      "by the sampler; 0: every trial drawn whole")
    reuse_parent: Literal["uniform", "contribution"] = Field(
        "uniform", description="which feasible front trial a continuation continues: any, evenly (uniform), or "
                               "drawn in proportion to its own share of the front's hypervolume (contribution: "
                               "in practice the high-accuracy end and the trials beside wide gaps)")
    reuse_per_prefix: Optional[int] = Field(None, ge=1, description="continuations started from one prefix (a "
                                                                    "front trial's chain and the fields it keeps) "
                                                                    "at most; null: no limit")
    start_with_setup: bool = Field(False, description="run the setup's own chain, as it defines it, as the first "
                                                      "trial (the initial assumption as the first candidate; "
                                                      "skipped with a warning when a value is outside the space)")
    reuse_redraw: Literal["last", "structural"] = Field(
        "structural",
        description="what a continuation re-draws: the front trial's nodes from the last one that changed the "
                    "model's structure (structural: its params, MACs or bytes on disk; after a distillation the "
                    "node before it too, so its continuations move along the cost objectives), or its last node "
                    "alone (last)")
    reuse_recover: float = Field(0.5, ge=0, le=1, description="share of the continuations that append a recovery "
                                                              "node (an inserted kind of early_stop.recovered_by: a "
                                                              "distillation) to a trial whose last node changed the "
                                                              "model's structure, every node of it kept (its "
                                                              "checkpoint, not run again): a feasible front trial, or "
                                                              "one at most recover_within below the constraint line; "
                                                              "each trial once; 0: none")
    recover_within: float = Field(0.03, ge=0, le=1, description="how far below the constraint line (accuracy) a "
                                                                "trial may end and still be continued with a "
                                                                "recovery node (reuse_recover)")
    reuse_after: Optional[int] = Field(None, ge=1, description="trials asked before continuations may start "
                                                               "(default: the sampler's start-up trials)")
    retries: int = Field(2, ge=0, description="re-runs of a trial (or of the shared prefix) whose worker was lost")
    reference_runs: list[str] = Field(default_factory=list, description="results folders plotted beside the "
                                                                        "front (default: the named setups' runs "
                                                                        "found in output_dir)")

    @field_validator("trials")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"trials must be a positive number of trials (got {v})")
        return v

    @field_validator("quality")
    @classmethod
    def _quality(cls, v: str) -> str:
        if v in QUALITY_EXCLUDED or v in OBJECTIVES and v != "accuracy":
            raise ValueError(f"{v!r} is not a quality where higher is better; allowed: accuracy, or a quality "
                             f"column the model's validation step logs (recall_top_k, ...)")
        return v

    @field_validator("objectives")
    @classmethod
    def _metrics(cls, v: list[str], info: ValidationInfo) -> list[str]:
        quality = info.data.get("quality", "accuracy")
        for name in v:
            if name not in OBJECTIVES and name != quality:
                extra = f", {quality} (search.quality)" if quality not in OBJECTIVES else \
                    "; a quality column the model logs (recall_top_k, ...) after search.quality=<it>"
                raise ValueError(f"objective {name!r} is not a metric; allowed: {', '.join(OBJECTIVES)}{extra}")
        if len(set(v)) != len(v):
            raise ValueError(f"objectives must differ (got {v})")
        return v

    @classmethod
    def parse(cls, data: Optional[Mapping[str, Any]]) -> "SearchConfig":
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as err:
            raise ConfigError(validation_message("search", err, cls)) from None

    def early_stop_margin(self, val_accuracy: Optional[float], val_samples: Optional[int]) -> float:
        """``early_stop.margin`` in accuracy: as set, or (``auto``) twice the standard error of a validation
        accuracy ``val_accuracy`` measured on ``val_samples`` samples, at least half of ``max_accuracy_drop`` (a
        later node recovers that much; 0.02 when the split's size is not known)."""
        margin = self.early_stop.margin
        if margin != "auto":
            return float(margin)
        if not val_samples or not isinstance(val_accuracy, (int, float)):
            return AUTO_MARGIN_UNKNOWN
        return max(2 * standard_error(val_accuracy, val_samples), (self.max_accuracy_drop or 0.0) / 2)

    def directions(self) -> list[str]:
        return [OBJECTIVES.get(o, "maximize") for o in self.objectives]  # the quality: higher better
