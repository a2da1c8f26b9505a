"""The model's inputs as named positional tensors, the wrapper every exporter traces, and errors.

Exporters trace ``forward(*tensors)``; models take a tensor, a tuple or ``**dict`` (Hugging Face).
:class:`Signature` records the input names in order (dict keys, else ``input_0``...), which dims
vary (the batch; also the sequence for integer inputs such as token ids) and turns a call of the
torch model into the runtime's feed. :func:`export_error` turns an exporter's failure into one line
naming the runtime and the layer that failed.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..data import call_model, primary_output
from ..errors import NodeError, error_line
from ..nodes.toolkit import forward_hooks


@dataclass(frozen=True)
class Signature:
    names: tuple[str, ...]
    keyword: bool  # the model is called with **dict (else positionally)

    @classmethod
    def of(cls, inputs: Any) -> "Signature":
        if isinstance(inputs, dict):
            return cls(tuple(k for k, v in inputs.items() if isinstance(v, torch.Tensor)), True)
        if isinstance(inputs, tuple):
            return cls(tuple(f"input_{i}" for i in range(len(inputs))), False)
        return cls(("input_0",), False)

    def tensors(self, inputs: Any) -> tuple[torch.Tensor, ...]:
        """The inputs of one call in signature order."""
        if isinstance(inputs, dict):
            return tuple(inputs[k] for k in self.names)
        return tuple(inputs) if isinstance(inputs, tuple) else (inputs,)

    def bind(self, args: Sequence[Any], kwargs: dict) -> tuple[torch.Tensor, ...]:
        """The tensors of a call ``runner(*args, **kwargs)`` made as the torch model would be called."""
        if kwargs:
            missing = [k for k in self.names if k not in kwargs]
            if missing:
                raise TypeError(f"missing inputs {missing}; the exported model takes {list(self.names)}")
            return tuple(kwargs[k] for k in self.names)
        if len(args) == 1 and isinstance(args[0], dict):
            return self.bind((), args[0])
        if len(args) != len(self.names):
            raise TypeError(f"the exported model takes {len(self.names)} inputs {list(self.names)}, got {len(args)}")
        return tuple(args)

    def dynamic_dims(self, tensors: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
        """Per input, the dims that vary between calls: the batch, and every dim of integer inputs (token ids)."""
        return [tuple(range(t.dim())) if not t.is_floating_point() else (0,) for t in tensors]

    def to_json(self) -> dict:
        return {"names": list(self.names), "keyword": self.keyword}

    @classmethod
    def from_json(cls, data: dict) -> "Signature":
        return cls(tuple(data["names"]), bool(data["keyword"]))


class Positional(nn.Module):
    """``forward(*tensors)`` -> the model's primary output tensor (logits / last hidden state)."""

    def __init__(self, model: nn.Module, signature: Signature):
        super().__init__()
        self.model = model
        self.signature = signature

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if self.signature.keyword:
            out = self.model(**dict(zip(self.signature.names, tensors)))
        else:
            out = self.model(*tensors)
        return primary_output(out)


@contextmanager
def layer_tracker(model: nn.Module) -> Iterator[list[str]]:
    """The names of the modules running right now (innermost last), kept when an exception leaves them."""
    stack: list[str] = []
    failed: list[str] = []

    def pre(name: str) -> Callable:
        def hook(_module, _inputs) -> None:
            stack.append(name)
        return hook

    def post(name: str) -> Callable:
        def hook(_module, _inputs, _output) -> None:  # returns None: the output stays the module's
            if stack and stack[-1] == name:
                stack.pop()
        return hook

    names = [name for name, _ in model.named_modules() if name]
    with forward_hooks(model, {n: post(n) for n in names}, pre={n: pre(n) for n in names}):
        try:
            yield failed
        except BaseException:
            failed.extend(stack)
            raise


def _leaf_inputs(model: nn.Module, inputs: Any) -> list[tuple[str, nn.Module, tuple]]:
    """Every leaf module with the positional inputs it received in one forward pass."""
    seen: list[tuple[str, nn.Module, tuple]] = []
    def hook(name: str) -> Callable:
        def record(module, args) -> None:
            seen.append((name, module, args))
        return record

    leaves = {name: hook(name) for name, m in model.named_modules() if name and not list(m.children())}
    with forward_hooks(model, pre=leaves):
        try:
            with torch.inference_mode():
                call_model(model, inputs)
        except Exception:  # noqa: BLE001 - the layers seen before the failure are still candidates
            pass
    return seen


def failing_layer(model: nn.Module, inputs: Any, tracked: Sequence[str],
                  export_one: Callable[[nn.Module, tuple], None]) -> Optional[str]:
    """The layer an export failed in: the innermost module running when it failed, else the first leaf
    module that fails to export on its own (``export_one``) with the inputs it receives in the model."""
    if tracked:
        return tracked[-1]
    for name, module, args in _leaf_inputs(model, inputs):
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            continue
        try:
            export_one(module, tuple(a.clone() for a in args))
        except Exception:  # noqa: BLE001 - this leaf is the one the runtime cannot take
            return f"{name} ({type(module).__name__})"
    return None


def export_error(node: str, runtime: str, layer: Optional[str], err: BaseException) -> NodeError:
    where = f"layer {layer}" if layer else "the model"
    return NodeError(node, f"{runtime} export failed at {where}: {error_line(err, typed=True, limit=300)}")
