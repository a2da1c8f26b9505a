"""Optional ``export`` step: a ``torch.export`` archive (``model.pt2``) that loads without the model's code.

torch.export cannot serialise torch.ao's packed weights (TorchScript objects),
so the int8 model is first rewritten into plain tensor arithmetic with the same
numbers: int8 weights stored as ``torch.int8`` buffers with their scales, and
activations rounded to the int8 grid (plain aten ops) exactly where the
int8 model rounds them. The archive is the deployable artefact; it computes in
fp32 (a reference of the int8 model, to be lowered by a compiler such as
Inductor), it is not the fast path the node itself returns.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
import torch.nn.functional as F
from torch import nn

from ...data import call_model, first_batch, split_batch, to_device
from ...errors import NodeError
from .modules import DynamicConv, SmoothDynamicLinear, _reduce, im2col_apply

EXPORT_FILE = "model.pt2"
_STATIC_LINEAR = (nnq.Linear, nniq.LinearReLU)
_STATIC_CONV = (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d)
_DYNAMIC = (nnqd.Linear,)  # our DynamicLinear, SmoothDynamicLinear and DynamicConv derive from it


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """Round ``x`` to the uint8 grid ``[0, qmax]`` of ``scale``/``zero_point`` and back (plain aten ops)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, qmax)
    return (q - zero_point) * scale


def _int_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(int values, scale, zero point)`` of a quantized weight; per-tensor params become 1-element tensors."""
    if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return w.int_repr(), torch.tensor([w.q_scale()]), torch.tensor([float(w.q_zero_point())])
    return w.int_repr(), w.q_per_channel_scales().float(), w.q_per_channel_zero_points().float()


class _RefLayer(nn.Module):
    """A quantized Linear/Conv as tensor arithmetic: dequantized int8 weight, rounded activations."""

    def __init__(self, module: nn.Module):
        super().__init__()
        w, b = module._weight_bias()
        q, scale, zp = _int_weight(w)
        self.register_buffer("qweight", q)
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero_point", zp)
        self.register_buffer("bias", b.detach().float() if b is not None else None)
        self.conv = {k: getattr(module, k) for k in ("stride", "padding", "dilation", "groups")} \
            if w.dim() > 2 else None
        self.dynamic = isinstance(module, _DYNAMIC)
        self.im2col = dict(module.geometry) if isinstance(module, DynamicConv) else None
        self.act_max = 127 if self.dynamic and _reduce(module) else 255
        self.relu = isinstance(module, (nniq.LinearReLU, nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d))
        self.register_buffer("input_scale", module.input_scale.clone() if isinstance(module, SmoothDynamicLinear)
                             else None)
        out_scale, out_zp = (getattr(module, "scale", 1.0), getattr(module, "zero_point", 0))
        self.register_buffer("out_scale", torch.tensor(float(out_scale)))
        self.register_buffer("out_zero_point", torch.tensor(float(int(out_zp))))

    def weight(self) -> torch.Tensor:
        shape = [-1] + [1] * (self.qweight.dim() - 1)
        return (self.qweight.float() - self.w_zero_point.view(shape)) * self.w_scale.view(shape)

    def _dynamic_input(self, x: torch.Tensor) -> torch.Tensor:
        """Per-tensor activation rounding as the dynamic int8 kernels do it (range always includes 0)."""
        if self.input_scale is not None:
            x = x * self.input_scale
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
        scale = ((hi - lo) / self.act_max).clamp(min=torch.finfo(torch.float32).eps)
        zp = (-lo / scale).round().clamp(0, self.act_max)
        return fake_quant(x, scale, zp, self.act_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.im2col is not None:
            return im2col_apply(x, self.im2col, lambda cols: F.linear(self._dynamic_input(cols), self.weight(), self.bias))
        if self.dynamic:
            x = self._dynamic_input(x)
        if self.conv is None:
            y = F.linear(x, self.weight(), self.bias)
        else:
            conv = (F.conv1d, F.conv2d, F.conv3d)[self.qweight.dim() - 3]
            y = conv(x, self.weight(), self.bias, **self.conv)
        if self.dynamic:
            return y
        if self.relu:
            y = F.relu(y)
        return fake_quant(y, self.out_scale, self.out_zero_point, 255)


class _RefEmbedding(nn.Module):
    """int8 embedding rows (float row-wise qparams), dequantized after the lookup."""

    def __init__(self, module: nn.Module):
        super().__init__()
        q, scale, zp = _int_weight(module.weight())
        self.register_buffer("qweight", q)
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero_point", zp)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(indices, self.qweight.float())
        return (rows - F.embedding(indices, self.w_zero_point[:, None])) * F.embedding(indices, self.w_scale[:, None])


class _RefQuantize(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.register_buffer("scale", module.scale.detach().float().reshape(()))
        self.register_buffer("zero_point", module.zero_point.detach().float().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.scale, self.zero_point, 255)


def _reference_module(module: nn.Module) -> Optional[nn.Module]:
    if isinstance(module, _DYNAMIC + _STATIC_LINEAR + _STATIC_CONV):
        return _RefLayer(module)
    if isinstance(module, nnq.Embedding):
        return _RefEmbedding(module)
    if isinstance(module, nnq.Quantize):
        return _RefQuantize(module)
    if isinstance(module, nnq.DeQuantize):
        return nn.Identity()
    return None


def _rewrite_graph(model: torch.fx.GraphModule) -> None:
    """FX int8 graphs: ``quantize_per_tensor`` becomes rounding in float, ``dequantize`` disappears."""
    graph = model.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.quantize_per_tensor:
            x, scale, zero_point = node.args[:3]
            with graph.inserting_before(node):
                fq = graph.call_function(fake_quant, (x, scale, zero_point, 255))
            node.replace_all_uses_with(fq)
            graph.erase_node(node)
        elif node.op == "call_method" and node.target == "dequantize":
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_function" and "quantized" in str(getattr(node.target, "__module__", "")) + str(node.target):
            raise NotImplementedError(f"quantized op {node.target} has no float reference")
    model.recompile()


def reference_model(quantized: nn.Module) -> nn.Module:
    """A copy of ``quantized`` in plain tensor arithmetic (int8 weights kept as int8 buffers)."""
    model = copy.deepcopy(quantized).cpu().eval()
    for name, module in list(model.named_modules()):
        ref = _reference_module(module) if name else None
        if ref is not None:
            model.set_submodule(name, ref)
    if isinstance(model, torch.fx.GraphModule):
        _rewrite_graph(model)
    return model


def _example(batches: Optional[list[Any]], ctx: Any) -> Any:
    if batches:
        return batches[0]
    loader = next(x for x in (ctx.test_loader, ctx.val_loader, ctx.train_loader) if x is not None)
    return split_batch(to_device(first_batch(loader), "cpu"))[0]


def export_program(quantized: nn.Module, batches: Optional[list[Any]], ctx: Any, label: str) -> None:
    """Write ``model.pt2`` (torch.export) of ``quantized`` into ``ctx.output_dir``."""
    inputs = _example(batches, ctx)
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (inputs if isinstance(inputs, tuple) else (inputs,), {})
    try:
        ref = reference_model(quantized)
        with torch.inference_mode():
            call_model(ref, inputs)
        batch = torch.export.Dim.AUTO  # any batch size where the model allows it
        shapes = {k: {0: batch} for k in kwargs} if kwargs else tuple({0: batch} for _ in args)
        program = torch.export.export(ref, args, kwargs, dynamic_shapes=shapes)
    except Exception as err:  # noqa: BLE001 - reported as this node's one-line error
        raise NodeError(label, f"export failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                               f"set export=false to keep the int8 checkpoint only") from None
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, ctx.output_dir / EXPORT_FILE)
