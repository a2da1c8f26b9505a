"""``training`` node (FedCore ``training_model``): fit the model with the shared loop."""
from __future__ import annotations

from typing import ClassVar, Literal

from torch import nn

from ..context import NodeContext
from ..registry import register_node
from ..schema import NodeConfig, TrainParams
from ..trainer import train


class TrainingConfig(TrainParams, NodeConfig):
    kind: Literal["training"] = "training"
    trains_float_weights: ClassVar[bool] = True


@register_node(TrainingConfig)
def apply_training(model: nn.Module, config: TrainingConfig, ctx: NodeContext) -> nn.Module:
    params = TrainParams.model_validate(config.model_dump(exclude={"kind", "name"}))
    train(model, ctx, params)
    return model
