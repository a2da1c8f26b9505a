"""``distillation`` node (FedCore ``distilation_model``): the current model learns from a teacher.

The teacher is the model as it entered the setup, or a checkpoint given by
``teacher_checkpoint`` (rebuilt on the setup's input model). The loss mixes
KL divergence on temperature-softened logits, MSE on outputs, the cosine
distance of per-sample outputs (per-token ones mean-pooled: a sentence
embedding), and the task loss on labeled batches; unlabeled data is fine. A module defining its own step
(ptls ``shared_step``) is distilled on the step's output, head included.
"""
from __future__ import annotations

import copy
from typing import ClassVar, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from ..checkpoint import load_model
from ..context import NodeContext
from ..errors import ConfigError, FedcoreError
from ..losses import distillation_mse, pooled_cosine_distance, soft_target_kl, token_mask
from ..registry import register_node
from ..schema import NodeConfig, TrainParams, searchable
from ..steps import step_output
from ..trainer import train


class DistillationConfig(TrainParams, NodeConfig):
    kind: Literal["distillation"] = "distillation"
    temperature: float = Field(2.0, gt=0, json_schema_extra=searchable(1.0, 8.0, step=0.5))
    kl_weight: float = Field(1.0, ge=0, description="weight of KL(teacher || student) on softened logits")
    mse_weight: float = Field(0.0, ge=0, description="weight of MSE between student and teacher outputs")
    cosine_weight: float = Field(0.0, ge=0, description="weight of 1 - cosine of each sample's output (per-token "
                                                        "outputs mean-pooled over the attention_mask first)")
    task_weight: float = Field(0.0, ge=0, description="weight of the task loss on labeled batches")
    teacher_checkpoint: Optional[str] = Field(None, description="checkpoint folder; default: the setup's input model")
    trains_float_weights: ClassVar[bool] = True

    @model_validator(mode="after")
    def _some_loss(self) -> "DistillationConfig":
        if self.kl_weight == self.mse_weight == self.cosine_weight == self.task_weight == 0:
            raise ValueError("at least one of kl_weight, mse_weight, cosine_weight, task_weight must be > 0")
        fine_tune_only = {"distill", "distill_weight", "unlabeled_loss", "unlabeled_mse_weight"}
        given = sorted(k for k in fine_tune_only & self.model_fields_set  # a re-validated dump
                       if getattr(self, k) != TrainParams.model_fields[k].default)  # repeats the defaults
        if given:
            raise ValueError(f"{', '.join(given)}: options of training and fine-tunes, not of the distillation node; "
                             f"set its loss with kl_weight, mse_weight, cosine_weight and task_weight")
        return self


def distillation_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, target: Optional[torch.Tensor],
                      config: DistillationConfig, task_loss,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted sum of KL on softened logits, output MSE (padded tokens masked out), the cosine distance of the
    (mean-pooled) outputs and (when labeled) the task loss."""
    loss = student_out.new_zeros(())
    if config.kl_weight:
        loss = loss + config.kl_weight * soft_target_kl(student_out, teacher_out, config.temperature)
    if config.mse_weight:
        loss = loss + config.mse_weight * distillation_mse(student_out, teacher_out, attention_mask)
    if config.cosine_weight:
        loss = loss + config.cosine_weight * pooled_cosine_distance(student_out, teacher_out, attention_mask)
    if config.task_weight and target is not None:
        loss = loss + config.task_weight * task_loss(student_out, target)
    return loss


@register_node(DistillationConfig)
def apply_distillation(model: nn.Module, config: DistillationConfig, ctx: NodeContext) -> nn.Module:
    teacher = ctx.teacher
    if config.teacher_checkpoint:
        try:
            teacher = load_model(config.teacher_checkpoint, copy.deepcopy(ctx.teacher))
        except FedcoreError as err:  # e.g. a teacher that is not the input model's ancestor
            raise ConfigError(f"teacher_checkpoint={config.teacher_checkpoint!r} cannot be rebuilt on the run's "
                              f"teacher (the input model, or the one the caller gave): {err}") from None
    teacher = teacher.to(ctx.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def objective(student: nn.Module, inputs, target):
        out, target = step_output(student, inputs, target)  # a module's own step output: its head included
        with torch.no_grad():
            teacher_out = step_output(teacher, inputs, target)[0]
        return distillation_loss(out, teacher_out, target, config, ctx.loss_fn, token_mask(inputs))

    params = TrainParams.model_validate(config.model_dump(include=set(TrainParams.model_fields)))
    reuse_key = None if config.teacher_checkpoint else {"distillation": config.model_dump(mode="json")}
    train(model, ctx, params, objective=objective, tag="distill", reuse_key=reuse_key)
    return model
