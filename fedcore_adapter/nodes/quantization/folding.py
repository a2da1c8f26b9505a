"""BatchNorm folding: ``conv -> bn`` pairs become one conv (eval statistics), replayable by name."""
from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_CONV_BN = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


def _is_pair(conv: nn.Module, bn: nn.Module) -> bool:
    return any(type(conv) is c and type(bn) is b for c, b in _CONV_BN)


def _pairs_from_graph(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs where a conv's only user is a BatchNorm (torch.fx trace); raises when not traceable."""
    import torch.fx

    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op == "call_module" and _is_pair(modules.get(node.target), modules.get(user.target)):
            pairs.append((str(node.target), str(user.target)))
    return pairs


def _pairs_from_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs of adjacent children of ``nn.Sequential`` containers (for models torch.fx cannot trace)."""
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (a, conv), (b, bn) in zip(children, children[1:]):
                if _is_pair(conv, bn):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` pairs whose BatchNorm can be folded into the conv."""
    try:
        return _pairs_from_graph(model)
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to Sequential adjacency
        return _pairs_from_sequentials(model)


def fold_batchnorm_(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """Fold each BatchNorm into its conv in place (the BN becomes ``nn.Identity``); model must be in eval mode."""
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        model.set_submodule(conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        model.set_submodule(bn_name, nn.Identity())
    return model
