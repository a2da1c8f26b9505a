"""Optional ``export`` step: a ``torch.export`` archive (``model.pt2``) that loads without the model's code.

torch.export cannot serialise torch.ao's packed weights (TorchScript objects
behind ``torch.ops.quantized``), and the pt2e Q/DQ ops (``quantized_decomposed``)
are registered only by importing torch.ao in Python, so an archive using them
fails ``torch.export.load`` in a plain interpreter. The int8 model is therefore
rewritten into core aten ops with the same numbers (``int8_ops``): int8 weight
buffers and int8 GEMMs (``aten._int_mm``). The int8 ops FX puts between layers
(``quantized.add``, ``mul``, ``cat``) compute in float and round to their output
grid. Attribute-bag outputs (``SimpleNamespace``, Hugging Face ``ModelOutput``)
come back as plain dicts, so that loading needs torch only.
"""
from __future__ import annotations

import copy
import functools
import inspect
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...data import call_model, first_batch, split_batch, to_device
from ...errors import NodeError
from ..toolkit import forward_hooks
from .int8_ops import DYNAMIC, STATIC_CONV, STATIC_LINEAR, fake_quant, reference_module

EXPORT_FILE = "model.pt2"


def _requantized(op: Any, relu: bool = False) -> Any:
    """A binary int8 op of an FX int8 graph as float ``op`` then rounding to its output grid."""
    def fn(a: torch.Tensor, b: torch.Tensor, scale: Any, zero_point: Any) -> torch.Tensor:
        y = op(a, b)
        return fake_quant(F.relu(y) if relu else y, scale, zero_point, 255)
    return fn


def _cat(tensors: list[torch.Tensor], dim: int = 0, scale: Any = None, zero_point: Any = None) -> torch.Tensor:
    y = torch.cat(tensors, dim)
    return y if scale is None else fake_quant(y, scale, zero_point, 255)


# int8 functional ops FX conversion emits (residual adds, gates, concatenations) -> float forms on the int8 grid
_QUANTIZED_OPS = {
    "add": _requantized(torch.add), "add_relu": _requantized(torch.add, relu=True),
    "mul": _requantized(torch.mul), "mul_relu": _requantized(torch.mul, relu=True),
    "matmul": _requantized(torch.matmul), "cat": _cat,
}


def _quantized_op(target: Any) -> Optional[str]:
    """``'add'`` for ``torch.ops.quantized.add`` (any overload), None for other targets."""
    name = str(target)
    return name.split(".")[1] if name.startswith("quantized.") else None


def _rewrite_graph(model: torch.fx.GraphModule) -> None:
    """FX int8 graphs: ``quantize_per_tensor`` becomes rounding in float, ``dequantize`` disappears,
    int8 functional ops (``quantized.add`` ...) compute in float and round to their output grid."""
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
        elif node.op == "call_function" and (name := _quantized_op(node.target)) is not None:
            if name not in _QUANTIZED_OPS:
                raise NotImplementedError(f"int8 op quantized.{name} has no core aten form here "
                                          f"(supported: {', '.join(sorted(_QUANTIZED_OPS))})")
            node.target = _QUANTIZED_OPS[name]
    model.recompile()


@torch.inference_mode()
def static_input_qparams(model: nn.Module, inputs: Any) -> dict[str, tuple[float, int]]:
    """``{name: (scale, zero point)}`` of the quantized input each static int8 layer receives on ``inputs``."""
    seen: dict[str, tuple[float, int]] = {}

    def hook(name: str, _module: nn.Module, args: tuple) -> None:
        seen[name] = (args[0].q_scale(), args[0].q_zero_point())

    hooks = {n: functools.partial(hook, n) for n, m in model.named_modules()
             if isinstance(m, STATIC_LINEAR + STATIC_CONV) and not isinstance(m, DYNAMIC)}
    with forward_hooks(model, pre=hooks):
        call_model(model, inputs)
    return seen


def reference_model(quantized: nn.Module, inputs: Any) -> nn.Module:
    """A copy of ``quantized`` in core aten ops (int8 buffers, int8 GEMMs); ``inputs``: an example batch."""
    model = copy.deepcopy(quantized).cpu().eval()
    qparams = static_input_qparams(model, inputs)
    for name, module in list(model.named_modules()):
        ref = reference_module(module, qparams.get(name)) if name else None
        if ref is not None:
            model.set_submodule(name, ref)
    if isinstance(model, torch.fx.GraphModule):
        _rewrite_graph(model)
    return model


def _plain(out: Any) -> Any:
    """Attribute-bag outputs as plain dicts: ``SimpleNamespace``, dict subclasses (Hugging Face ``ModelOutput``)."""
    if isinstance(out, SimpleNamespace):
        return dict(vars(out))
    return dict(out) if isinstance(out, dict) and type(out) is not dict else out


class _PlainOutputs(nn.Module):
    """``model`` returning plain containers, so the archive's output needs no class of the model's library."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _plain(self.model(*args, **kwargs))


def plain_outputs(model: nn.Module) -> nn.Module:
    """``_PlainOutputs(model)`` with ``model.forward``'s signature (torch.export binds inputs by those names)."""
    params = list(inspect.signature(model.forward).parameters.values())

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _PlainOutputs.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params])
    return type("PlainOutputs", (_PlainOutputs,), {"forward": forward})(model)


def _example(batches: Optional[list[Any]], ctx: Any) -> Any:
    if batches:
        return batches[0]
    loader = next(x for x in (ctx.test_loader, ctx.val_loader, ctx.train_loader) if x is not None)
    return split_batch(to_device(first_batch(loader), "cpu"))[0]


def export_program(quantized: nn.Module, batches: Optional[list[Any]], ctx: Any, label: str) -> None:
    """Write ``model.pt2`` (torch.export) of ``quantized`` into ``ctx.output_dir``."""
    inputs = _example(batches, ctx)
    if isinstance(inputs, dict):
        args, kwargs = (), inputs
    else:
        args, kwargs = (inputs if isinstance(inputs, tuple) else (inputs,)), {}
    try:
        ref = reference_model(quantized, inputs)
        with torch.inference_mode():
            out = call_model(ref, inputs)
        if _plain(out) is not out:
            ref = plain_outputs(ref)
        batch = torch.export.Dim.AUTO  # any batch size where the model allows it
        shapes = {k: {0: batch} for k in kwargs} if kwargs else tuple({0: batch} for _ in args)
        program = torch.export.export(ref, args, kwargs, dynamic_shapes=shapes)
    except Exception as err:  # noqa: BLE001 - reported as this node's one-line error
        raise NodeError(label, f"export failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                               f"set export=false to keep the int8 checkpoint only") from None
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, ctx.output_dir / EXPORT_FILE)
