"""``qat`` (FedCore ``training_aware_quant``): fake-quant training with the shared loop, then a real
int8 model. ``learnable_scales`` makes the scales trainable (LSQ, as in the compress seed): ranges
are first calibrated on a few batches, then learned by back-propagation with the weights."""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from ...context import NodeContext
from ...data import first_batch, split_batch, to_device
from ...errors import DataError, NodeError
from ...registry import register_node
from ...schema import TrainParams
from ...trainer import train
from ..toolkit import input_batches
from .ao import calibrate, convert_model, prepare_model
from .calibration import check_engine
from .config import PTQStaticConfig, QATConfig
from .ptq import auto_skip_layers, export_if_asked
from .static import _quantized as _static_quantized, choose_graph, int8_layers, static_plan


def _start_learning_scales(prepared: nn.Module, lr_factor: float) -> None:
    """After calibration: learn scales (and activation zero points) at ``lr_factor`` times the weights'
    learning rate; symmetric weights keep zero point 0."""
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    for module in prepared.modules():
        if isinstance(module, _LearnableFakeQuantize):
            module.enable_param_learning()
            module.scale.lr_scale = module.zero_point.lr_scale = lr_factor  # read by trainer.make_optimizer
            if module.qscheme in (torch.per_channel_symmetric, torch.per_tensor_symmetric):
                module.zero_point.requires_grad_(False)


@register_node(QATConfig)
def apply_qat(model: nn.Module, config: QATConfig, ctx: NodeContext) -> nn.Module:
    label = ctx.node_label or config.label
    check_engine(config.backend, label)
    layers, keep_float = int8_layers(model, config.skip, ctx, label)
    try:
        example = split_batch(to_device(first_batch(ctx.train_loader, "train_dataloader()"), "cpu"))[0]
    except DataError:
        raise NodeError(label, "QAT trains on train_dataloader(), which yielded no batches") from None
    work = copy.deepcopy(model).cpu()
    graph = choose_graph(work.eval(), config, layers, keep_float, example, label, method="qat")
    if config.auto_skip is not None:  # sensitivity measured with static PTQ (fast), before training
        batches = input_batches(ctx.val_loader, config.auto_skip.batches) or [example]
        static_cfg = config.model_dump(include={"backend", "per_channel"})
        quantize = functools.partial(_static_quantized, config=PTQStaticConfig(**static_cfg), layers=layers,
                                     graph=graph, batches=batches)
        keep_float = auto_skip_layers(ctx, config.auto_skip, quantize, work.eval(), batches, layers, keep_float,
                                      log=False)
    plan = static_plan(config, layers, set(keep_float), graph, example, work, method="qat")
    plan["learnable"] = config.learnable_scales
    prepared = prepare_model(work, plan)
    if config.learnable_scales:
        calibrate(prepared, input_batches(ctx.train_loader, config.calibration_batches))
        _start_learning_scales(prepared, config.scale_lr_factor)
    params = TrainParams.model_validate(config.model_dump(include=set(TrainParams.model_fields)))
    train(prepared, ctx, params, tag="qat")
    quantized = convert_model(prepared, plan)
    ctx.record_structure("quantize", plan)
    export_if_asked(quantized, config, [example], ctx, label)
    return quantized
