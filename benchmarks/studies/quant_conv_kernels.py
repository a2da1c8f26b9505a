"""Dynamic int8 convolution kernels on the MNIST-1D CNN's shapes, layer by layer and whole model, vs fp32.

    python -m benchmarks.studies.quant_conv_kernels [--threads 2 1] [--batches 256 1] [--rounds 5]

Per conv layer (random weights, BatchNorm with random statistics): the fp32 block
(conv -> BatchNorm -> ReLU, as the float model runs it) against
- torch.ao's own dynamic conv (``quantized::conv1d_dynamic``, x86 engine) + ReLU,
- im2col + torch.ao's dynamic int8 GEMM (``DynamicConv``, the kernel of earlier plans) + ReLU,
- ``Int8Conv`` (per-call input quantization + oneDNN int8 conv, ReLU fused), and its two parts alone:
  the input quantization and the int8 convolution on an already quantized input.
``rel_err``: relative L2 error of the block's output against fp32. Whole model: ``ptq_dynamic`` plans
(Linear only, convs as im2col, convs as ``Int8Conv``) against the fp32 model. Timings are interleaved
round by round (``quant_timing``); speed-up = median of per-round fp32 / variant ratios.
"""
from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig


from fedcore_adapter.nodes.quantization.backends import quantized_engine
from fedcore_adapter.nodes.quantization.config import PTQDynamicConfig
from fedcore_adapter.nodes.quantization.conv import Int8Conv, quantize_dynamic_uint8
from fedcore_adapter.nodes.quantization.dynamic import make_plan, swap_dynamic_
from fedcore_adapter.nodes.quantization.modules import DynamicConv
from fedcore_adapter.nodes.quantization.selective import quantizable_layers
from fedcore_adapter.zoo.models import MNIST1DCNN
from torch.nn.utils.fusion import fuse_conv_bn_eval

from benchmarks.common import environment, markdown
from benchmarks.timing import interleaved_latency


def float_model() -> nn.Module:
    torch.manual_seed(0)
    model = MNIST1DCNN().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2)
    return model


def layer_variants(conv: nn.Conv1d, bn: nn.BatchNorm1d, x: torch.Tensor) -> dict:
    """``{name: (call, output)}`` for one conv block."""
    fused = fuse_conv_bn_eval(copy.deepcopy(conv), bn)
    fused.qconfig = per_channel_dynamic_qconfig
    with quantized_engine("x86"):
        packed = torch.ops.quantized.conv1d_prepack(
            torch.quantize_per_channel(fused.weight.detach(), *_weight_qparams(fused), 0, torch.qint8),
            fused.bias.detach(), list(fused.stride), list(fused.padding), list(fused.dilation), 1)
        im2col = DynamicConv.from_conv(fused)
    int8 = Int8Conv.from_conv(fused, relu=True)
    int8.channels_last_output = True
    q, scale, zero_point = quantize_dynamic_uint8(x, False)
    g = int8.geometry
    calls = {
        "fp32 conv+BN+ReLU": lambda: torch.relu(bn(conv(x))),
        "torch.ao conv1d_dynamic + ReLU": lambda: torch.relu(torch.ops.quantized.conv1d_dynamic(x, packed, False)),
        "im2col + int8 GEMM + ReLU (older plans)": lambda: torch.relu(im2col(x)),
        "Int8Conv (quantize + oneDNN conv+ReLU)": lambda: int8(x),
        "  its input quantization alone": lambda: quantize_dynamic_uint8(x, False),
        "  its int8 conv alone": lambda: torch.ops.onednn.qconv1d_pointwise(
            q, scale, zero_point, int8._pack(), int8.w_scale, torch.zeros_like(int8.w_scale, dtype=torch.long),
            int8.bias, g["stride"], g["padding"], g["dilation"], 1, 1.0, 0, torch.float32, "relu", [], ""),
    }
    return calls


def _weight_qparams(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    observer = conv.qconfig.weight()
    observer(conv.weight.detach())
    scale, zero_point = observer.calculate_qparams()
    return scale.double(), zero_point


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def model_variants(fp32: nn.Module) -> dict[str, nn.Module]:
    def quantized(allow_conv: bool, im2col: bool = False) -> nn.Module:
        model = copy.deepcopy(fp32)
        kinds = ["linear"] + ["conv"] * allow_conv
        plan = make_plan(model, quantizable_layers(model, kinds), frozenset(), PTQDynamicConfig(allow_conv=allow_conv))
        if im2col:  # what plans written before Int8Conv replay
            plan = {k: v for k, v in plan.items() if k not in ("conv_kernel", "fused_relu", "channels_last")}
        return swap_dynamic_(model, plan)

    return {"fp32": fp32, "ptq_dynamic Linear only": quantized(False),
            "ptq_dynamic allow_conv, im2col (older plans)": quantized(True, im2col=True),
            "ptq_dynamic allow_conv, Int8Conv": quantized(True)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    fp32 = float_model()
    blocks = [(i, fp32.features[i], fp32.features[i + 1]) for i in range(0, len(fp32.features), 3)]
    models = model_variants(fp32)
    layer_rows, model_rows = [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            per_round = 20 if batch > 8 else 100
            x = torch.randn(batch, 1, 40)
            h = x
            with torch.inference_mode():
                for _, conv, bn in blocks:
                    calls = layer_variants(conv, bn, h)
                    ref = calls["fp32 conv+BN+ReLU"]()
                    timing = interleaved_latency(calls, "fp32 conv+BN+ReLU", rounds=args.rounds, per_round=per_round)
                    shape = f"{conv.in_channels}->{conv.out_channels} k{conv.kernel_size[0]} s{conv.stride[0]}"
                    for name, fn in calls.items():
                        out = fn() if not name.startswith("  ") else None
                        layer_rows.append({"threads": threads, "batch": batch, "layer": shape, "variant": name,
                                           "us": round(timing[name]["latency_ms"] * 1e3, 1),
                                           "speedup": round(timing[name]["speedup"], 2),
                                           "rel_err": "" if out is None else f"{rel_err(out, ref):.4f}"})
                    h = ref
                ref = fp32(x)
                timing = interleaved_latency({k: (lambda m=m, x=x: m(x)) for k, m in models.items()}, "fp32",
                                             rounds=args.rounds, per_round=per_round)
                for name, model in models.items():
                    t = timing[name]
                    model_rows.append({"threads": threads, "batch": batch, "model": name,
                                       "latency_ms": round(t["latency_ms"], 4), "speedup": round(t["speedup"], 2),
                                       "speedup_range": f"{t['speedup_min']:.2f}-{t['speedup_max']:.2f}",
                                       "rel_err": f"{rel_err(model(x), ref):.4f}"})
    env = environment().split(", ")
    print(env[0], "(thread count: per row),", ", ".join(env[2:]))
    print(markdown(layer_rows, list(layer_rows[0])))
    print()
    print(markdown(model_rows, list(model_rows[0])))


if __name__ == "__main__":
    main()
