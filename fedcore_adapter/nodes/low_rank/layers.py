"""The factorised layer and JSON descriptions of the plain layers it is made of.

A :class:`FactorizedLayer` is two ordinary torch layers run one after the
other (``second(first(x))``), so every tool that understands ``nn.Linear`` /
``nn.ConvNd`` / ``nn.Embedding`` (torch-pruning, torch.ao quantization, the
FLOP counter) sees real layers:

- Linear ``in -> out``:  ``Linear(in, r)`` then ``Linear(r, out)``
- Conv, ``channel`` mode: ``ConvNd(in, r, k)`` then a 1x1 ``ConvNd(r, out)``
- Conv2d, ``spatial`` mode: ``Conv2d(in, r, (kh, 1))`` then ``Conv2d(r, out, (1, kw))``
- Embedding ``num x dim``: ``Embedding(num, r)`` then ``Linear(r, dim)``; it keeps ``num_embeddings``,
  ``embedding_dim`` and ``padding_idx`` (the padding row stays zero), so code reading them still works
"""
from __future__ import annotations

from typing import Any

from torch import nn

KINDS = ("linear", "conv", "embedding")


class FactorizedLayer(nn.Module):
    """``second(first(x))``: a layer replaced by two smaller ones of rank ``rank``."""

    def __init__(self, first: nn.Module, second: nn.Module, kind: str, mode: str = "channel"):
        super().__init__()
        self.first = first
        self.second = second
        self.kind = kind
        self.mode = mode

    def forward(self, x):
        return self.second(self.first(x))

    @property
    def rank(self) -> int:
        """Inner width (it may shrink if a later node prunes these layers): the second layer's input size, which
        its int8 versions expose too (their ``weight`` is a method or absent)."""
        second = self.second
        return int(second.in_features if hasattr(second, "in_features") else second.in_channels)

    def _embedding(self, attribute: str) -> nn.Embedding:
        if self.kind != "embedding":
            raise AttributeError(f"a factorised {self.kind} layer has no {attribute} (only a factorised embedding)")
        return self.first

    # A factorised embedding still reads as an nn.Embedding (ptls's TrxEncoder reads these three).
    @property
    def num_embeddings(self) -> int:
        return self._embedding("num_embeddings").num_embeddings

    @property
    def embedding_dim(self) -> int:
        self._embedding("embedding_dim")
        return self.second.out_features

    @property
    def padding_idx(self):
        return self._embedding("padding_idx").padding_idx

    def extra_repr(self) -> str:
        return f"kind={self.kind}, mode={self.mode}, rank={self.rank}"


def layer_kind(module: nn.Module) -> str | None:
    """``'linear'``, ``'conv'`` or ``'embedding'`` for a layer this node can factorise, else None."""
    if isinstance(module, FactorizedLayer):
        return module.kind
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1:
        return "conv"
    if isinstance(module, nn.Embedding) and module.max_norm is None:
        return "embedding"
    return None


def module_config(module: nn.Module) -> dict[str, Any]:
    """JSON description of a plain Linear / Conv1d / Conv2d / Embedding (enough to rebuild it)."""
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return {"type": type(module).__name__, "in_channels": module.in_channels,
                "out_channels": module.out_channels, "kernel_size": list(module.kernel_size),
                "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None,
                "padding_mode": module.padding_mode}
    if isinstance(module, nn.Embedding):
        return {"type": "Embedding", "num_embeddings": module.num_embeddings,
                "embedding_dim": module.embedding_dim, "padding_idx": module.padding_idx}
    if isinstance(module, FactorizedLayer):
        return {"type": "FactorizedLayer", "kind": module.kind, "mode": module.mode,
                "first": module_config(module.first), "second": module_config(module.second)}
    raise TypeError(f"cannot describe a {type(module).__name__}")


def build_module(cfg: dict[str, Any]) -> nn.Module:
    """Rebuild a layer (weights uninitialised in meaning: a state dict is loaded afterwards)."""
    kind = cfg["type"]
    if kind == "Linear":
        return nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg["bias"])
    if kind in ("Conv1d", "Conv2d"):
        cls = nn.Conv1d if kind == "Conv1d" else nn.Conv2d
        padding = cfg["padding"] if isinstance(cfg["padding"], str) else tuple(cfg["padding"])
        return cls(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), stride=tuple(cfg["stride"]),
                   padding=padding, dilation=tuple(cfg["dilation"]), groups=cfg["groups"], bias=cfg["bias"],
                   padding_mode=cfg["padding_mode"])
    if kind == "Embedding":
        return nn.Embedding(cfg["num_embeddings"], cfg["embedding_dim"], padding_idx=cfg["padding_idx"])
    if kind == "FactorizedLayer":
        return FactorizedLayer(build_module(cfg["first"]), build_module(cfg["second"]), cfg["kind"], cfg["mode"])
    raise ValueError(f"unknown module type {kind!r} in decompose_config; known: Linear, Conv1d, Conv2d, Embedding, "
                     f"FactorizedLayer")


def io_dims(module: nn.Module) -> tuple[int, int]:
    """``(inputs, outputs)`` of a layer: features, channels, or (vocabulary, embedding width)."""
    if isinstance(module, FactorizedLayer):
        return io_dims(module.first)[0], io_dims(module.second)[1]
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    raise TypeError(f"{type(module).__name__} is not a factorisable layer")
