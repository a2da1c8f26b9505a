"""BatchNorm folding: ``conv -> bn`` pairs become one conv (eval statistics), replayable by name."""
from __future__ import annotations

from typing import Any, Optional

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


def _single_use_relus(model: nn.Module) -> set[str]:
    """Names of ``nn.ReLU`` modules registered once (replacing a shared one would change its other uses)."""
    seen: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.ReLU:
            seen.setdefault(id(module), []).append(name)
    return {names[0] for names in seen.values() if len(names) == 1}


def _conv_ends_in_graph(model: nn.Module, convs: set[str], skip: set[str]) -> list[tuple[Any, Any]]:
    """``(conv node, end node)`` for every call of a conv in ``convs`` (torch.fx trace): the end is the last
    ``skip`` module reached through nodes read by one user only (the conv itself when none follows).
    Raises when the model is not traceable."""
    import torch.fx

    graph = torch.fx.symbolic_trace(model).graph
    ends = []
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) not in convs:
            continue
        end = node
        while len(end.users) == 1:
            user = next(iter(end.users))
            if user.op != "call_module" or str(user.target) not in skip:
                break
            end = user
        ends.append((node, end))
    return ends


def _conv_successors_in_sequentials(model: nn.Module, convs: set[str],
                                    skip: set[str]) -> list[tuple[str, Optional[str]]]:
    """``(conv, next)`` for every conv in ``convs`` inside an ``nn.Sequential``: ``next`` is the first
    sibling after it that is not a ``skip`` module (None at the end of the Sequential)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        prefix = f"{name}." if name else ""
        names = [prefix + n for n, _ in module.named_children()]
        for i, conv in enumerate(names):
            if conv not in convs:
                continue
            j = i + 1
            while j < len(names) and names[j] in skip:
                j += 1
            found.append((conv, names[j] if j < len(names) else None))
    return found


def _relu_pairs_from_graph(model: nn.Module, convs: set[str], skip: set[str]) -> list[tuple[str, str]]:
    """Pairs where a conv's output (through ``skip`` modules: its folded BatchNorm) feeds only a ReLU module
    that the model calls once (torch.fx trace); raises when not traceable."""
    ends = _conv_ends_in_graph(model, convs, skip)
    relus = _single_use_relus(model)
    calls: dict[str, int] = {}
    for node in (ends[0][0].graph.nodes if ends else ()):
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node, end in ends:
        user = next(iter(end.users)) if len(end.users) == 1 else None
        target = str(user.target) if user is not None and user.op == "call_module" else None
        if target in relus and calls.get(target) == 1:
            pairs.append((str(node.target), target))
    return pairs


def _relu_pairs_from_sequentials(model: nn.Module, convs: set[str], skip: set[str]) -> list[tuple[str, str]]:
    relus = _single_use_relus(model)
    return [(conv, nxt) for conv, nxt in _conv_successors_in_sequentials(model, convs, skip) if nxt in relus]


def conv_relu_pairs(model: nn.Module, convs: set[str], folded_bn: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(conv_name, relu_name)`` pairs among ``convs`` whose ReLU can run inside the int8 convolution:
    the conv (after its folded BatchNorm) feeds only that ReLU, and the ReLU module is used nowhere else."""
    skip = {bn for _, bn in folded_bn}
    try:
        return _relu_pairs_from_graph(model, convs, skip)
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to Sequential adjacency
        return _relu_pairs_from_sequentials(model, convs, skip)


def _feeds_only_convs_graph(model: nn.Module, convs: set[str], skip: set[str]) -> list[str]:
    return [str(node.target) for node, end in _conv_ends_in_graph(model, convs, skip)
            if end.users and all(u.op == "call_module" and str(u.target) in convs for u in end.users)]


def _feeds_only_convs_sequentials(model: nn.Module, convs: set[str], skip: set[str]) -> list[str]:
    return [conv for conv, nxt in _conv_successors_in_sequentials(model, convs, skip) if nxt in convs]


def convs_feeding_convs(model: nn.Module, convs: set[str], skip: set[str]) -> list[str]:
    """Convs among ``convs`` whose output (through ``skip`` modules: folded BatchNorms, fused ReLUs)
    is read only by other convs among ``convs`` -- those may hand over channels-last tensors."""
    try:
        return _feeds_only_convs_graph(model, convs, skip)
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to Sequential adjacency
        return _feeds_only_convs_sequentials(model, convs, skip)
