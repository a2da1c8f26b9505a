"""The search space: candidate chains (moves from a setup's initial assumption) and the fields each node
config declares searchable (``schema.searchable``), narrowed or widened by ``search.space``.

A node of the initial chain keeps its id (``pruning#1`` is nodes[1]) in every candidate chain, so the
optimiser learns one ``pruning#1.pruning_ratio`` across chain variants; an inserted node is ``<kind>+``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel

from ..errors import ConfigError, error_line
from ..registry import get_node, known_kinds
from ..schema import Setup
from .config import Moves, SearchConfig

SPEC_KEYS = ("low", "high", "log", "step", "choices", "type", "list")
TRAINING_KINDS = ("training",)  # what ``prefix: auto`` shares: leading nodes that fit the model


@dataclass(frozen=True)
class Dimension:
    """One searchable field of one node: ``name`` is ``<node id>.<field path>``."""

    name: str
    path: str
    type: Literal["float", "int", "categorical"]
    low: Any = None
    high: Any = None
    log: bool = False
    step: Optional[float] = None
    choices: tuple = ()
    as_list: bool = False

    def suggest(self, trial: Any) -> Any:
        value = self._suggest(trial)
        return [value] if self.as_list else value

    def _suggest(self, trial: Any) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        value = trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log, step=self.step)
        return round(value, 10) if self.step else value  # a grid point as written (0.6, not 0.6000000000000001)

    def contains(self, value: Any) -> bool:
        """Whether the sampler could draw ``value`` (a choice; a number in the range, on its grid)."""
        if self.type == "categorical":
            return value in self.choices
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not self.low <= value <= self.high:
            return False
        cells = (value - self.low) / self.step if self.step else 0.0
        return abs(cells - round(cells)) < 1e-6

    def describe(self) -> str:
        if self.type == "categorical":
            return f"{self.name} in {list(self.choices)}"
        grid = f", step {self.step:g}" if self.step else ""
        return f"{self.name} in [{self.low}, {self.high}]" + (" (log)" if self.log else "") + grid


@dataclass(frozen=True)
class Template:
    """A node a candidate chain may hold: its fields as in the setup (or the insert template) and its dimensions."""

    id: str
    node: dict
    dims: tuple[Dimension, ...]

    @property
    def kind(self) -> str:
        return self.node["kind"]


@dataclass
class SearchSpace:
    setup: Setup
    prefix: list[dict]
    templates: dict[str, Template]
    chains: dict[str, tuple[str, ...]]  # label -> template ids, the initial chain first
    common: dict = field(default_factory=dict)
    moves: Optional[Moves] = None  # the ``search.moves`` the chains were derived with (``neighbours``)
    _allowed: dict = field(default_factory=dict, repr=False)  # chain label -> a valid setup (``allows``)

    @property
    def initial(self) -> str:
        return next(iter(self.chains))

    def dimensions(self) -> list[Dimension]:
        ids = {t for chain in self.chains.values() for t in chain}
        return [d for t in self.templates.values() if t.id in ids for d in t.dims]

    def is_empty(self) -> bool:
        return len(self.chains) < 2 and not self.dimensions()

    def suggest(self, trial: Any, append: tuple[str, ...] = ()) -> tuple[str, list[dict]]:
        """``(chain label, the chain's nodes)`` for an optuna trial (define-by-run); ``append``: templates added
        after the drawn chain (a recovery continuation's node, :meth:`recovery_templates`), their fields drawn."""
        label = trial.suggest_categorical("chain", list(self.chains)) if len(self.chains) > 1 else self.initial
        ids = self.chains[label] + tuple(append)
        nodes = copy.deepcopy(self.prefix)
        for tid in ids:
            template = self.templates[tid]
            node = copy.deepcopy(template.node)
            for dim in template.dims:
                _set_path(node, dim.path, dim.suggest(trial))
            nodes.append(node)
        return chain_label(ids), nodes

    def recovery_templates(self, kinds: typing.Iterable[str]) -> list[str]:
        """The insert templates (``<kind>+``) of the node ``kinds`` that recover accuracy (a distillation)."""
        return [f"{kind}+" for kind in kinds if f"{kind}+" in self.templates]

    def validate(self, ids: tuple[str, ...]) -> None:
        """Parse the chain of template ``ids`` after the prefix as a setup: ``ConfigError`` names what the chain
        rules forbid."""
        nodes = self.prefix + [self.templates[t].node for t in ids]
        Setup.parse({"name": self.setup.name, "common": self.common, "nodes": copy.deepcopy(nodes)})

    def allows(self, ids: tuple[str, ...]) -> bool:
        """Whether the chain of template ``ids`` after the prefix is a valid setup (:meth:`validate`), remembered."""
        key = chain_label(ids)
        if key not in self._allowed:
            try:
                self.validate(ids)
                self._allowed[key] = True
            except ConfigError:
                self._allowed[key] = False
        return self._allowed[key]

    def defined(self, tid: str) -> dict[str, Any]:
        """The searchable values of node ``tid`` as the setup (or the insert template) defines them, else its node
        config's defaults, named and shaped as :meth:`suggest` draws them (``<node id>.<field path>``: value)."""
        template = self.templates[tid]
        config = get_node(template.kind).config_cls.model_validate(template.node)
        out = {}
        for dim in template.dims:
            value = _get_path(config, dim.path)
            if dim.as_list and isinstance(value, (list, tuple)):
                value = value[0] if len(value) == 1 else value
            out[dim.name] = value
        return out

    def initial_params(self) -> Optional[dict[str, Any]]:
        """The setup's own chain as it defines it (the initial assumption), named as :meth:`suggest` draws it;
        None when one of its values is outside the space (a range narrowed past it, off its grid)."""
        params: dict[str, Any] = {"chain": self.initial} if len(self.chains) > 1 else {}
        for tid in self.chains[self.initial]:
            values = self.defined(tid)
            if not all(dim.contains(values[dim.name]) for dim in self.templates[tid].dims):
                return None
            params.update(values)
        return params

    def neighbours(self, label: str) -> list[str]:
        """The space's chains one chain move (drop, insert, reorder as ``search.moves`` allows) from chain
        ``label``, either way (a move that leads back to it too: the dropped node put back), in the space's order:
        the steps an optimiser that edits chains may take without leaving the space."""
        moves = self.moves or Moves()
        chain = self.chains[label]
        ahead = set(_moves(chain, self.templates, moves))
        return [name for name, other in self.chains.items() if other != chain
                and (other in ahead or chain in _moves(other, self.templates, moves))]

    def signature(self) -> str:
        data = {"prefix": self.prefix, "chains": self.chains, "common": self.common,
                "templates": {k: [t.node, [d.__dict__ for d in t.dims]] for k, t in self.templates.items()}}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def describe(self) -> str:
        lines = [f"prefix (shared): {' -> '.join(n['kind'] for n in self.prefix) or '(none)'}",
                 f"chains ({len(self.chains)}): " + ", ".join(self.chains)]
        lines += [f"  {d.describe()}" for d in self.dimensions()]
        return "\n".join(lines)


def _set_path(node: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _nested_model(annotation: Any) -> Optional[type]:
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def declared_fields(config: BaseModel, prefix: str = "") -> dict[str, tuple[Any, dict]]:
    """``{field path: (annotation, declared spec)}`` of a validated node config, nested configs it holds included."""
    out: dict[str, tuple[Any, dict]] = {}
    for name, info in type(config).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if "search" in extra and not (extra["search"].get("if_set") and getattr(config, name, None) is None):
            out[prefix + name] = (info.annotation, dict(extra["search"]))
        nested = _nested_model(info.annotation)
        value = getattr(config, name, None)
        if nested is not None and isinstance(value, BaseModel):
            out.update(declared_fields(value, f"{prefix}{name}."))
    return out


def _all_fields(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, info in type(config).model_fields.items():
        out[prefix + name] = info.annotation
        value = getattr(config, name, None)
        if isinstance(value, BaseModel):
            out.update(_all_fields(value, f"{prefix}{name}."))
    return out


def _dimension(name: str, path: str, annotation: Any, spec: dict, where: str) -> Dimension:
    kind = spec.get("type")
    literal = [a for a in typing.get_args(annotation)] if typing.get_origin(annotation) is Literal else None
    if kind is None:
        if spec.get("choices") is not None or annotation is bool or literal:
            kind = "categorical"
        elif annotation is int:
            kind = "int"
        else:
            kind = "float"
    if kind == "categorical":
        choices = spec.get("choices") or ([False, True] if annotation is bool else literal)
        if not choices:
            raise ConfigError(f"{where}: give choices: [...] for a categorical field")
        return Dimension(name, path, "categorical", choices=tuple(choices), as_list=bool(spec.get("list")))
    if kind not in ("float", "int"):
        raise ConfigError(f"{where}.type = {kind!r}: allowed: float, int, categorical")
    low, high = spec.get("low"), spec.get("high")
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or not low < high:
        raise ConfigError(f"{where}: a numeric range needs low < high (got low={low!r}, high={high!r})")
    if spec.get("log") and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0 (got {low})")
    step = spec.get("step")
    if step is not None:
        if not isinstance(step, (int, float)) or isinstance(step, bool) or step <= 0 or spec.get("log"):
            raise ConfigError(f"{where}.step = {step!r}: a grid step is a number > 0 on a linear range "
                              f"(step: null searches the range continuously; log ranges take no step)")
        cells = (high - low) / step
        if abs(cells - round(cells)) > 1e-6 or (kind == "int" and step != int(step)):
            raise ConfigError(f"{where}: step {step} does not divide [{low}, {high}] into whole steps; "
                              f"choose low, high and step so that (high - low) / step is whole")
    return Dimension(name, path, kind, low, high, bool(spec.get("log")), step,
                     as_list=bool(spec.get("list")))


def _fitted_step(spec: Mapping[str, Any]) -> Any:
    """A declared grid step fitted to a range the user gave: the coarsest step no wider than the declared one
    that divides ``[low, high]`` into whole steps (the declared 0.05 on [0.94, 0.96]: 0.02)."""
    low, high, step = spec.get("low"), spec.get("high"), spec["step"]
    if not all(isinstance(v, (int, float)) for v in (low, high)) or not low < high:
        return step  # _dimension names what is wrong
    cells = max(1, math.ceil((high - low) / step - 1e-6))
    return step if abs((high - low) / step - cells) < 1e-6 else round((high - low) / cells, 12)


def _user_specs(space: Mapping[str, Any], node_index: Optional[int], kind: str) -> dict[str, Any]:
    """What ``search.space`` says about a node: its kind's entry, then its index's (index wins)."""
    out: dict[str, Any] = {}
    for ref in (kind, str(node_index) if node_index is not None else None):
        entry = space.get(ref) if ref is not None else None
        if entry is None:
            continue
        if entry is False:
            out["*"] = False
            continue
        if not isinstance(entry, Mapping):
            raise ConfigError(f"search.space.{ref} = {entry!r}: expected {{<field>: spec or false}} or false")
        out.update(_flatten_specs(entry))
    return out


def _flatten_specs(entry: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{finetune_params: {epochs: {low: 1}}}`` -> ``{'finetune_params.epochs': {low: 1}}``."""
    out = {}
    for key, value in entry.items():
        if isinstance(value, Mapping) and value and not set(value) & set(SPEC_KEYS):
            out.update(_flatten_specs(value, f"{prefix}{key}."))
        else:
            out[prefix + str(key)] = value
    return out


def node_dimensions(node_id: str, node: dict, node_index: Optional[int], space: Mapping[str, Any],
                    ranges: Optional[Mapping[str, Any]] = None) -> tuple:
    """The dimensions of one node: declared defaults, merged with ``ranges`` (an insert template's own ranges,
    ``template_ranges``) and then with ``search.space``."""
    kind = node["kind"]
    config = get_node(kind).config_cls.model_validate(node)
    declared = declared_fields(config)
    user = _user_specs(space, node_index, kind)
    if user.pop("*", None) is False and not user:
        return ()
    ranges = {k: v for k, v in (ranges or {}).items() if k not in user}
    user = {**ranges, **user}
    every = _all_fields(config)
    dims = []
    for path in sorted(set(declared) | set(user)):
        where = f"search.{'insert_templates' if path in ranges else 'space'}.{kind}.{path}"
        parent = next((path[:i] for i in range(len(path)) if path[i] == "." and path[:i] in every), None)
        if path not in every and parent is not None:
            raise ConfigError(f"search.space.{kind}.{path}: unknown key {path[len(parent) + 1:]!r} of a spec; allowed: "
                              f"{', '.join(SPEC_KEYS)}")
        if path not in every:
            allowed = ", ".join(sorted(declared)) or "none declared"
            raise ConfigError(f"{where}: {kind} has no field {path!r}; its searchable fields: {allowed}")
        annotation, spec = declared.get(path, (every[path], {}))
        wanted = user.get(path)
        if wanted is False or (wanted is None and path in user):
            continue
        if isinstance(wanted, Mapping):
            bad = sorted(set(wanted) - set(SPEC_KEYS))
            if bad:
                raise ConfigError(f"{where}.{bad[0]}: unknown key; allowed: {', '.join(SPEC_KEYS)}")
            drop_grid = wanted.get("log") and "step" not in wanted  # a log range drops the declared grid
            spec = {**{k: v for k, v in spec.items() if not (drop_grid and k == "step")}, **wanted, "default": True}
            if "step" not in wanted and spec.get("step"):
                spec["step"] = _fitted_step(spec)
        elif wanted is not None:
            raise ConfigError(f"{where} = {wanted!r}: expected a spec {{low, high, log, step, choices}} or false")
        if not spec.get("default", True):
            continue
        dims.append(_dimension(f"{node_id}.{path}", path, annotation, spec, where))
    for dim in dims:  # a nested field's parents (a default ``method``) written out, so the value has a place
        parts = dim.path.split(".")[:-1]
        target, value = node, config
        for part in parts:
            value = getattr(value, part)
            if not isinstance(target.get(part), dict):
                target[part] = value.model_dump(mode="json", exclude_unset=False)
            target = target[part]
    return tuple(dims)


def _node_mapping(config: BaseModel) -> dict:
    return {"kind": config.kind, **config.model_dump(mode="json", exclude_unset=True)}


def prefix_length(setup: Setup, scfg: SearchConfig) -> int:
    if scfg.prefix != "auto":
        if not 0 <= int(scfg.prefix) < len(setup.nodes):
            raise ConfigError(f"search.prefix = {scfg.prefix}: the setup has {len(setup.nodes)} node(s); the shared "
                              f"prefix must leave at least one to search (0..{len(setup.nodes) - 1})")
        return int(scfg.prefix)
    n = 0
    while n < len(setup.nodes) - 1 and setup.nodes[n].kind in TRAINING_KINDS:
        n += 1
    return n


def _moves(chain: tuple[str, ...], templates: dict[str, Template], moves: Moves) -> list[tuple[str, ...]]:
    out = []
    if moves.drop and len(chain) > 1:
        out += [chain[:i] + chain[i + 1:] for i in range(len(chain))]
    present = {templates[t].kind for t in chain}
    for kind in moves.insert:
        if kind in present:
            continue
        out += [chain[:i] + (f"{kind}+",) + chain[i:] for i in range(len(chain) + 1)]
    if moves.reorder:
        for i in range(len(chain) - 1):
            if templates[chain[i]].kind != templates[chain[i + 1]].kind:
                out.append(chain[:i] + (chain[i + 1], chain[i]) + chain[i + 2:])
    return out


def template_ranges(kind: str, template: Mapping[str, Any]) -> tuple[dict, dict[str, Any]]:
    """An insert template split into the node's fields and the ranges searched: a field given as a spec
    (``{low, high, step, ...}`` or ``{choices}``) is searched over it and starts at its ``low`` (first choice);
    ``({field: value}, {field path: spec})``. The user's ``search.space.<kind>`` overrides these ranges."""
    fields: dict[str, Any] = {}
    ranges: dict[str, Any] = {}
    for path, value in _flatten_specs(copy.deepcopy(dict(template))).items():
        if isinstance(value, Mapping) and set(value) & set(SPEC_KEYS):  # its keys: checked by node_dimensions
            if value.get("choices"):
                start = list(value["choices"])[0]
            elif isinstance(value.get("low"), (int, float)):
                start = value["low"]
            else:
                raise ConfigError(f"search.insert_templates.{kind}.{path} = {dict(value)!r}: a range needs low "
                                  f"and high, or choices")
            ranges[path] = dict(value)
            value = start
        _set_path(fields, path, value)
    return fields, ranges


def derive_space(setup: Setup, scfg: SearchConfig) -> SearchSpace:
    """Candidate chains within ``moves.depth`` moves of the setup's chain, each validated as a setup."""
    n_prefix = prefix_length(setup, scfg)
    for ref in scfg.space:
        if not (str(ref).isdigit() or ref in known_kinds()):
            raise ConfigError(f"search.space.{ref}: not a node kind or a node index; kinds: {', '.join(known_kinds())}")
        if str(ref).isdigit() and not n_prefix <= int(ref) < len(setup.nodes):
            raise ConfigError(f"search.space.{ref}: node {ref} is not searched (nodes {n_prefix}.."
                              f"{len(setup.nodes) - 1} are; the first {n_prefix} are the shared prefix)")
    prefix = [_node_mapping(n) for n in setup.nodes[:n_prefix]]
    templates: dict[str, Template] = {}
    initial = []
    for i in range(n_prefix, len(setup.nodes)):
        node = _node_mapping(setup.nodes[i])
        tid = f"{node['kind']}#{i}"
        templates[tid] = Template(tid, node, node_dimensions(tid, node, i, scfg.space))
        initial.append(tid)
    for kind in scfg.moves.insert:
        get_node(kind)  # an unknown kind fails here, with the registered kinds
        fields, ranges = template_ranges(kind, scfg.insert_templates.get(kind, {}))
        node = {**fields, "kind": kind}
        tid = f"{kind}+"
        try:
            templates[tid] = Template(tid, node, node_dimensions(tid, node, None, scfg.space, ranges))
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - pydantic (or a field validator): a bad insert template
            raise ConfigError(f"search.insert_templates.{kind}: {error_line(err, typed=False, limit=200)}") from None
    common = setup.common.model_dump(mode="json", exclude_unset=True)
    seen, frontier, order = {tuple(initial)}, [tuple(initial)], [tuple(initial)]
    for _ in range(scfg.moves.depth):
        nxt = []
        for chain in frontier:
            for cand in _moves(chain, templates, scfg.moves):
                if cand not in seen:
                    seen.add(cand)
                    nxt.append(cand)
        order += sorted(nxt, key=chain_label)
        frontier = nxt
    space = SearchSpace(setup, prefix, templates, {}, common, scfg.moves)
    space.validate(tuple(initial))  # the setup's own chain: its error as the chain rules give it
    # the others where the chain rules allow the move (not int8 before a training node, ...)
    space.chains.update((chain_label(chain), chain) for chain in order if space.allows(chain))
    return space


def chain_label(chain: tuple[str, ...]) -> str:
    """A chain's label: its template ids joined by ``>`` (``pruning#1>distillation+``)."""
    return ">".join(chain)

