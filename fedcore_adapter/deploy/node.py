"""The ``deploy`` node: export, quantize with the runtime's own quantizer, reload, verify, hand over a runner."""
from __future__ import annotations

import logging
import shutil
from typing import Any

import torch
from torch import nn

from ..context import NodeContext
from ..data import call_model, first_batch, has_quantized_weights, primary_output, split_batch
from ..errors import NodeError
from ..nodes.toolkit import input_batches
from ..registry import register_node
from .artifacts import runtime_module, write_info
from .config import DeployConfig
from .runner import relative_error
from .signature import Signature, export_error, failing_layer, layer_tracker

log = logging.getLogger("fedcore_adapter")


def _build_options(config: DeployConfig, threads: int) -> dict[str, Any]:
    if config.runtime == "onnxruntime":
        return {"per_channel": config.per_channel, "opset": config.opset}
    if config.runtime == "openvino":
        return {"model_type": config.model_type}
    return {"compile": config.compile, "threads": threads}


def _real_tokens(output: torch.Tensor, inputs: Any) -> torch.Tensor:
    """Token outputs at the real tokens only (``attention_mask`` 1): padded positions carry no meaning."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if isinstance(mask, torch.Tensor) and output.dim() >= 2 and output.shape[:2] == mask.shape:
        return output[mask.bool()]
    return output


@register_node(DeployConfig)
def apply_deploy(model: nn.Module, config: DeployConfig, ctx: NodeContext) -> nn.Module:
    """The runtime's int8 (or fp32) model of ``model``, as a runner; the artifact lands in the node folder."""
    runtime = runtime_module(config.runtime)
    if has_quantized_weights(model):
        raise NodeError(ctx.node_label, f"{config.runtime} takes a float model and quantizes it with its own "
                                        f"quantizer; remove the torch int8 node before deploy")
    model = model.to("cpu").eval()
    loader = ctx.test_loader or ctx.val_loader or ctx.train_loader
    inputs, _ = split_batch(first_batch(loader, "evaluation loader"))
    signature = Signature.of(inputs)
    example = signature.tensors(inputs)
    calibration = [signature.tensors(x) for x in input_batches(ctx.train_loader, config.calibration_batches)] \
        if config.quantize == "static" else []
    folder = ctx.output_dir
    folder.mkdir(parents=True, exist_ok=True)
    threads = config.threads or ctx.common.num_threads or torch.get_num_threads()
    try:
        with layer_tracker(model) as tracked:
            files = runtime.build(model, signature, example, folder, quantize=config.quantize, calibration=calibration,
                                  **_build_options(config, threads))
    except Exception as err:  # noqa: BLE001 - every exporter failure becomes one line naming the layer
        scratch = folder / ".leaf"
        scratch.mkdir(exist_ok=True)
        layer = failing_layer(model, inputs, tracked,
                              lambda m, args: runtime.export_leaf(m, args, scratch, config.opset))
        shutil.rmtree(folder, ignore_errors=True)
        raise export_error(ctx.node_label, config.runtime, layer, err) from None
    weight_dtype = "float32" if config.quantize == "none" else "int8+float32"
    runner = runtime.load(files[0], threads, model, weight_dtype)
    with torch.inference_mode():
        expected = primary_output(call_model(model, inputs))
        error = relative_error(_real_tokens(call_model(runner, inputs), inputs), _real_tokens(expected, inputs))
    if not error <= config.tolerance:
        shutil.rmtree(folder, ignore_errors=True)
        raise NodeError(ctx.node_label, f"the reloaded {config.runtime} model disagrees with the torch model: relative "
                                        f"output error {error:.3g} > tolerance {config.tolerance}")
    compiled = {"compile": config.compile} if config.runtime == "torch_compile" else {}
    write_info(folder, {"runtime": config.runtime, "artifact": files[0].name,
                        "files": [str(f.relative_to(folder)) for f in files],
                        "quantize": config.quantize, "threads": threads, **compiled, "weight_dtype": weight_dtype,
                        "inputs": signature.to_json(), "relative_error": error})
    log.info("%s: %s model written (%s, relative output error %.3g)", ctx.node_label, config.runtime,
             files[0].name, error)
    # the node's checkpoint keeps the float model it exported (resume, reload); the runner holds no weights
    ctx.checkpoint_options["state_dict"] = model.state_dict()
    return runner
