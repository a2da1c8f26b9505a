"""Channel pruning of any traceable model through torch-pruning's dependency graph.

Coupled channels (a conv, its BatchNorm, the next layer's inputs, residual
partners) are removed together; recurrent layers lose hidden units
(``recurrent``). Layers no pruning function covers (custom modules holding raw
parameters, LSTMs with ``proj_size``) are traced as opaque blocks and every
channel group touching them is kept, with a warning naming them; groups that
would change the model's output shape are never pruned. Inputs and outputs may
be ptls ``PaddedBatch`` objects (``padded``).
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Union

import torch
import torch_pruning as tp
from torch import nn

from ...data import call_model
from ...errors import NodeError
from ..toolkit import forward_hooks
from .factors import first_factors_of
from .history import History, apply_op
from .identity import identity_equality, plain_modules
from .layer_pruners import FrozenPruner, has_pruner
from .padded import floating_tensors, is_padded, traceable, traced_output, with_tensors
from .reconstruction import Reconstruction, refit_consumer, refittable
from .recurrent import (RECURRENT_PRUNER, RecurrentMagnitude, initial_state_parameters, is_recurrent, owner_sizes,
                        units_of)

Ratio = Union[float, dict[str, float]]


class PruningWarning(UserWarning):
    """A layer or option the pruning node had to leave alone."""


def unsupported_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Sub-modules with their own parameters whose channels no pruning function can remove.

    A recurrent layer's trainable initial state (``recurrent.initial_state_parameters``) is pruned
    with the layer, so the module holding it is not one of them.
    """
    states = initial_state_parameters(model)
    found = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{n}.") for n in found):
            continue
        own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        if own and not has_pruner(module) and not all(p in states for p in own):
            found[name] = module
    return found


class _Opaque(torch.autograd.Function):
    """Identity on a layer's outputs whose autograd node links straight to the layer's input."""

    @staticmethod
    def forward(ctx, source, *outputs):
        return tuple(o.clone() for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        return (None,) * (len(grads) + 1)


@contextmanager
def _opaque_forward(modules: dict[str, nn.Module], packed: Optional[set[int]] = None) -> Iterator[None]:
    """While tracing, each of ``modules`` shows as one graph node (its internals hidden); the ids of those
    called with a ``PackedSequence`` are added to ``packed``."""

    def wrap(module: nn.Module):
        original = module.forward

        def forward(*args, **kwargs):
            if packed is not None and args and isinstance(args[0], nn.utils.rnn.PackedSequence):
                packed.add(id(module))
            with torch.no_grad():
                out = original(*args, **kwargs)
            source = next(iter(floating_tensors((args, kwargs))), None)
            outputs = floating_tensors(out)
            if source is None or not outputs:
                return out
            out = with_tensors(out, _Opaque.apply(source, *outputs))
            return traceable(out) if is_padded(out) else out

        return forward

    for module in modules.values():
        module.forward = wrap(module)
    try:
        yield
    finally:
        for module in modules.values():
            del module.forward


@contextmanager
def trace_errors(model: nn.Module, label: str) -> Iterator[None]:
    """Turn a failure while tracing into one NodeError naming the innermost layer that was running."""
    stack: list[str] = []
    names = {module: name for name, module in model.named_modules()}

    def enter(name: str) -> None:
        stack.append(name)

    def leave() -> None:
        if stack:
            stack.pop()

    try:
        with forward_hooks(model, {module: lambda m, a, o: leave() for module in names},
                           pre={module: lambda m, a, n=name: enter(n) for module, name in names.items()}):
            yield
    except NodeError:
        raise
    except Exception as err:  # noqa: BLE001 - any tracing failure becomes one clear line
        where = f" in layer {stack[-1]!r} ({type(model.get_submodule(stack[-1])).__name__})" if stack and stack[-1] \
            else ""
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NodeError(label, f"cannot trace the model for pruning{where}: {type(err).__name__}: {reason}") from None


def build_importance(name: str, norm: float):
    """torch-pruning's importance criterion for a native importance name (magnitude: recurrent units' own
    weights count too, ``recurrent.RecurrentMagnitude``)."""
    imp = tp.importance
    return {
        "magnitude": lambda: RecurrentMagnitude(imp.MagnitudeImportance(p=norm), norm),
        "taylor": lambda: imp.TaylorImportance(),
        "lamp": lambda: imp.LAMPImportance(p=norm),
        "bn_scale": lambda: imp.BNScaleImportance(),
        "random": lambda: imp.RandomImportance(),
    }[name]()


def _matches(group: str, key: str) -> bool:
    """A ratio key names a group when it is the group's layer, a container of it, or a part of it."""
    return group == key or not key or group.startswith(f"{key}.") or key.startswith(f"{group}.")


def ratio_for(group: str, ratio: Ratio) -> float:
    if not isinstance(ratio, dict):
        return ratio
    hits = [(len(k), r) for k, r in ratio.items() if _matches(group, k)]
    return max(hits)[1] if hits else 0.0


def empties_layer(channels: int, ratio: float, round_to: Optional[int] = None) -> bool:
    """Whether removing ``ratio`` of ``channels`` (then rounding to ``round_to``) would leave none."""
    kept = int(channels * (1 - ratio))
    if round_to:
        kept -= kept % round_to
    return ratio > 0 and kept < 1


def screen_small_groups(label: str, groups: dict[str, tuple[int, float]], ratio: Ratio,
                        round_to: Optional[int] = None, unit: str = "channel") -> list[str]:
    """Groups (name -> (channels, ratio)) that their ratio would empty.

    A per-layer ratio (``pruning_ratio`` as a dict) that empties its layer is an
    error naming it; one ratio for the whole model leaves such small layers
    (e.g. rank-2 factors after low-rank) whole, with a warning naming them.
    """
    small = {g: (n, r) for g, (n, r) in groups.items() if empties_layer(n, r, round_to)}
    if not small:
        return []
    if isinstance(ratio, dict):
        layer, (channels, r) = next(iter(small.items()))
        step = round_to or 1
        limit = 1 - step / channels if channels > step else 0.0
        raise NodeError(label, f"pruning ratio {r:g} would remove every {unit} of layer {layer!r} "
                               f"({channels} {unit}s{f', round_to={round_to}' if round_to else ''}); "
                               f"use a ratio below {limit:.4g} for it")
    listed = ", ".join(f"{g!r} ({n} {unit}s)" for g, (n, _) in small.items())
    warnings.warn(f"node {label}: pruning ratio {next(iter(small.values()))[1]:g} would remove every {unit} of "
                  f"{listed}; kept whole (a per-layer pruning_ratio can prune them)", PruningWarning, stacklevel=4)
    return list(small)


def scheduled_ratio(schedule: str, ratio: float, step: int, steps: int) -> float:
    """Fraction of a layer's channels removed after ``step`` of ``steps``: linear (equal shares of the original
    channels per step, torch-pruning's) or geometric (the same fraction of the remaining ones per step)."""
    return ratio * step / steps if schedule == "linear" else 1 - (1 - ratio) ** (step / steps)


class GraphPruner:
    """Iterative channel pruning of ``model`` in place; every removal is recorded in a :class:`History`."""

    def __init__(self, model: nn.Module, example_inputs: Any, *, label: str, ratio: Ratio, steps: int,
                 importance: str = "magnitude", importance_norm: float = 2.0, global_pruning: bool = False,
                 round_to: Optional[int] = None, ignored_layers: tuple[str, ...] = (), schedule: str = "linear",
                 reconstruction: Optional[Reconstruction] = None):
        self.model, self.label, self.reconstruction = model, label, reconstruction
        self.skipped: list[str] = []
        if importance == "obs":
            raise NodeError(label, "importance 'obs' ranks the attention heads and FFN channels of transformer "
                                   "encoders, and this model has none; use magnitude, taylor, lamp, bn_scale or "
                                   "random (reconstruct works with each)")
        frozen = unsupported_modules(model)
        customized = {type(m): FrozenPruner() for m in frozen.values() if not is_recurrent(m)}
        customized.update({cls: RECURRENT_PRUNER for cls in RECURRENT_PRUNER.TARGET_MODULES})
        recurrent = {n: m for n, m in model.named_modules() if is_recurrent(m)}
        self.states = initial_state_parameters(model)
        ratio_dict = {}
        if isinstance(ratio, dict):
            ratio_dict = {self._module(key, "pruning_ratio"): r for key, r in ratio.items()}
        ignored = plain_modules(self._module(name, "ignored_layers") for name in ignored_layers)
        if importance == "bn_scale" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                for m in model.modules()):
            raise NodeError(label, "importance 'bn_scale' ranks channels by BatchNorm scales, but the model has no "
                                   "BatchNorm layer; use magnitude, taylor, lamp or random")
        was_training = model.training
        packed: set[int] = set()
        with trace_errors(model, label), _opaque_forward({**frozen, **recurrent}, packed), identity_equality(model), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="torch_pruning")
            self.pruner = tp.pruner.BasePruner(
                model, example_inputs, importance=build_importance(importance, importance_norm),
                global_pruning=global_pruning, pruning_ratio=0.0 if ratio_dict else float(ratio),
                pruning_ratio_dict=ratio_dict or None, iterative_steps=steps, ignored_layers=ignored,
                iterative_pruning_ratio_scheduler=lambda r, n: [scheduled_ratio(schedule, r, i, n)
                                                                for i in range(n + 1)],
                round_to=round_to, customized_pruners=customized,
                root_module_types=[nn.modules.conv._ConvNd, nn.Linear, nn.RNNBase],
                out_channel_groups={m: 2 for m in recurrent.values() if m.bidirectional},
                forward_fn=lambda m, x: call_model(m, x), output_transform=traced_output)
        model.train(was_training)
        self._recurrent_ratios(ratio_dict)
        # torch-pruning reads the slicing that packs and unpacks sequences as channel slices
        self.reasons = {n: "called with a PackedSequence" for n, m in recurrent.items() if id(m) in packed}
        frozen.update({n: recurrent[n] for n in self.reasons})
        self._protect(frozen)
        self.groups = self._group_table()
        self._validate(ratio, round_to)
        if not self.groups:
            warnings.warn(f"node {label}: no layer group can lose channels (layers producing the model's output and "
                          f"those coupled to kept layers stay whole); the model is left as it is",
                          PruningWarning, stacklevel=3)

    # -- set-up ------------------------------------------------------------------------------------
    def _module(self, name: str, field: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            layers = [n for n, m in self.model.named_modules()
                      if n and isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
            raise NodeError(self.label, f"{field} names layer {name!r}, which the model does not have; "
                                        f"its layers include: {', '.join(layers[:12])}") from None

    def _recurrent_ratios(self, ratio_dict: dict[nn.Module, float]) -> None:
        """Per-layer ratios for recurrent layers, which torch-pruning assigns only to its own layer types."""
        p = self.pruner
        for index, (key, ratio) in enumerate(ratio_dict.items()):
            scope = f"_User_Defined_Scope_{index}"  # torch-pruning's name for this key's scope
            for n, sub in enumerate(m for m in key.modules() if is_recurrent(m) and m not in p.pruning_ratio_dict):
                p._layer_to_scope[sub] = (scope if p.global_pruning else f"{scope}_recurrent_{n}", [key])
                p.pruning_ratio_dict[sub] = p.iterative_pruning_ratio_scheduler(ratio, p.iterative_steps)

    def _all_groups(self):
        p = self.pruner
        return p.DG.get_all_groups(ignored_layers=p.ignored_layers, root_module_types=p.root_module_types)

    def _protect(self, frozen: dict[str, nn.Module]) -> None:
        """Ignore groups that touch an unsupported layer or would change the model's output shape."""
        dg = self.pruner.DG
        frozen_ids = {id(m): n for n, m in frozen.items()}
        coupled: dict[str, set[str]] = {name: set() for name in frozen}
        for group in list(self._all_groups()):
            touched = {frozen_ids[id(dep.target.module)] for dep, _ in group if id(dep.target.module) in frozen_ids}
            outs = [dep.target for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)]
            at_output = any(not node.outputs for node in outs)
            if not touched and not at_output:
                continue
            kept = [node.module for node in outs if isinstance(node.module, nn.Module)]
            self.pruner.ignored_layers.extend(kept)
            if at_output:  # a factorised output layer is one layer: its inner rank stays too
                self.pruner.ignored_layers.extend(first_factors_of(self.model, kept))
            for name in touched:
                coupled[name].update(dg._module2name[n.module] for n in outs
                                     if n.module in dg._module2name and id(n.module) not in frozen_ids)
        for name, module in frozen.items():
            kept = f", with the channels coupled to it ({', '.join(sorted(coupled[name]))})" if coupled[name] else ""
            self.skipped.append(f"{name} ({type(module).__name__})")
            why = f" ({self.reasons[name]})" if name in self.reasons else ""
            warnings.warn(f"node {self.label}: torch-pruning cannot prune layer {name!r} ({type(module).__name__})"
                          f"{why}; it is kept whole{kept}", PruningWarning, stacklevel=4)

    def _group_table(self) -> dict[str, tuple[int, list[nn.Module]]]:
        """Prunable layer groups: root layer name -> (channels, layers whose outputs it prunes)."""
        dg = self.pruner.DG
        table = {}
        for group in self._all_groups():
            root = group[0].dep.target.module
            outs = [dep.target.module for dep, _ in group
                    if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, nn.Module)]
            table[dg._module2name[root]] = (dg.get_out_channels(root) // max(self.pruner._get_channel_groups(group), 1),
                                           outs)
        return table

    def _validate(self, ratio: Ratio, round_to: Optional[int]) -> None:
        if isinstance(ratio, dict):
            for key in ratio:
                if not any(_matches(g, key) for g in self.groups):
                    raise NodeError(self.label, f"pruning_ratio names {key!r}, which holds no prunable channel group; "
                                                f"prunable groups: {', '.join(list(self.groups)[:12])}")
        if self.pruner.global_pruning:
            return
        sizes = {g: (n, ratio_for(g, ratio)) for g, (n, _) in self.groups.items()}
        for name in screen_small_groups(self.label, sizes, ratio, round_to):
            self.pruner.ignored_layers.extend(self.groups.pop(name)[1])

    # -- pruning -----------------------------------------------------------------------------------
    def group_names(self) -> list[str]:
        return list(self.groups)

    def step(self, history: History, step: Optional[int] = None) -> None:
        """The next scheduled pruning step; records every module's removed indices in ``history``; with a
        reconstruction, the layers that lost inputs are then re-fitted to the model as it entered the step."""
        before = copy.deepcopy(self.model) if self.reconstruction is not None else None
        first = len(history.ops)
        self._prune(history)
        if before is not None:
            self._reconstruct(before, history.ops[first:])

    def _prune(self, history: History) -> None:
        dg = self.pruner.DG
        names = {id(m): n for n, m in self.model.named_modules()}
        for group in self.pruner.step(interactive=True):
            for dep, idxs in group:
                target = dep.target
                side = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
                idxs = tp._helpers.to_plain_idxs(idxs)
                if target.type == tp.ops.OPTYPE.PARAMETER:
                    history.add(dg._param_to_name[target.module], side, idxs, target.pruning_dim)
                elif id(target.module) in names and len(idxs):
                    history.add(names[id(target.module)], side, idxs, target.pruning_dim)
                    if side == "out" and is_recurrent(target.module):
                        self._prune_beside(names[id(target.module)], units_of(target.module, idxs), history)
            group.prune()

    def _reconstruct(self, before: nn.Module, ops: list[dict]) -> None:
        """Re-fit each layer that lost input channels in ``ops``, in model order, so its (kept) outputs match
        ``before``'s on the calibration batches."""
        kept: dict[tuple[str, str], list[int]] = {}
        for op in ops:
            try:
                layer = before.get_submodule(op["module"])
            except AttributeError:  # an unwrapped parameter
                continue
            if not refittable(layer):
                kept.setdefault((op["module"], op["side"]), [])
                continue
            width = layer.weight.shape[1 if op["side"] == "in" else 0]
            alive = kept.setdefault((op["module"], op["side"]), list(range(width)))
            gone = set(op["idxs"])  # positions in the numbering left by this step's earlier removals
            alive[:] = [a for i, a in enumerate(alive) if i not in gone]
        left = []
        for name, layer in self.model.named_modules():
            if (name, "in") not in kept:
                continue
            if not refittable(layer):
                left.append(name)
                continue
            stats = self.reconstruction.stats(self.model, name, before, kept.get((name, "out")))
            refit_consumer(layer, stats)
        if left:
            warnings.warn(f"node {self.label}: reconstruct re-fits Linear and ungrouped, zero-padded Conv1d / Conv2d "
                          f"layers; left as pruned: {', '.join(left[:6])}", PruningWarning, stacklevel=3)

    def _prune_beside(self, layer: str, units: list[int], history: History) -> None:
        """The recurrent ``layer``'s trainable initial states lose its removed hidden ``units`` (last axis), and
        its owner's size attributes follow (ptls ``RnnEncoder.hidden_size``, read as its embedding size)."""
        for param, owner in self.states.items():
            if owner == layer:
                op = {"module": param, "side": "out", "dim": -1, "idxs": units}
                apply_op(self.model, op)
                history.add(param, "out", units, -1)
        owner_name = layer.rpartition(".")[0]
        owner = self.model.get_submodule(owner_name)
        sizes = owner_sizes(owner, self.model.get_submodule(layer), len(units))
        if sizes:
            for key, value in sizes.items():
                setattr(owner, key, value)
            history.set_attributes(owner_name, **sizes)
