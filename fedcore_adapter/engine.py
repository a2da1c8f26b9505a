"""The engine: runs a setup's nodes in order, measuring and checkpointing after each.

It knows no node: kinds are looked up in the registry, structural changes are
replayed through ``structure``, side concerns (tracking, ...) are hooks, and
independent measurements go through the executor it is given.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .checkpoint import (applied_transforms, checkpoint_bytes, link_or_copy_tree, load_model, mark_transforms,
                         read_manifest, save_checkpoint, write_json)
from .context import NodeContext, SequentialExecutor
from .data import make_loader, provides, resolve_device, runtime_device
from .errors import DataError, FedcoreError
from .hooks import Hook, HookList, RunInfo
from .losses import find_loss
from .metrics import measure
from .registry import get_node
from .results import PARTIAL_SUFFIX, finalize_folder, read_json, run_folder_name, write_metrics, write_text
from .schema import Setup
from .structure import transform_record

log = logging.getLogger("fedcore_adapter")


@dataclass
class RunResult:
    model: nn.Module
    metrics: list[dict]
    output_dir: Path
    setup: Setup
    status: str = "completed"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy ships with torch
        pass


def _check_datamodule(datamodule: Any) -> None:
    name = type(datamodule).__name__
    if not provides(datamodule, "train_dataloader"):
        raise DataError(f"data module {name} has no train_dataloader(); it must provide train_dataloader(), "
                        f"val_dataloader() and optionally test_dataloader()")
    if callable(getattr(datamodule, "prepare_data", None)):
        datamodule.prepare_data()
    if callable(getattr(datamodule, "setup", None)):
        datamodule.setup("fit")


def _loaders(datamodule: Any) -> tuple[Any, Any, Any]:
    """Fresh loaders (a node's shuffling never depends on what earlier nodes consumed, so resume is exact)."""
    return tuple(make_loader(datamodule, f"{split}_dataloader") for split in ("train", "val", "test"))


def _setup_hash(setup: Setup) -> str:
    return hashlib.sha256(json.dumps(setup.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _to_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


class _Run:
    """One execution of a setup: the state the engine loop carries between nodes."""

    def __init__(self, setup: Setup, datamodule: Any, *, loss: Any, conf_loss: Any, root: Path,
                 model_name: Optional[str], hooks: Sequence[Hook], executor: Any, config: Optional[dict]):
        self.setup = setup
        self.common = setup.common
        self.final_dir = root / run_folder_name(setup.name, model_name)
        self.dir = self.final_dir.with_name(self.final_dir.name + PARTIAL_SUFFIX)
        _check_datamodule(datamodule)
        self.datamodule = datamodule
        self.device = resolve_device(self.common.device)
        self.loss, self.conf_loss = loss, conf_loss
        self.hooks = HookList(hooks)
        self.executor = executor or SequentialExecutor()
        self.config = config if config is not None else {"setup": setup.to_dict()}
        self.rows: list[dict] = []
        self.transforms: list[dict] = []
        self.info = RunInfo(setup=setup, output_dir=self.dir, run_name=self.final_dir.name, config=self.config)
        self.run_json: dict = {}

    # -- bookkeeping -------------------------------------------------------------------------------
    def write_run_json(self, **fields: Any) -> None:
        self.run_json.update(fields, state=self.info.state)
        write_json(self.dir / "run.json", self.run_json)

    def node_dir(self, row_index: int, kind: str) -> Path:
        return self.dir / "nodes" / f"{row_index}_{kind}"

    def measure_row(self, model: nn.Module, checkpoint: Path, loss_fn) -> dict:
        if not self.common.measure:
            return {}
        device = runtime_device(model, self.device)
        model.to(device)
        train, val, test = _loaders(self.datamodule)
        return measure(model, test or val or train, device=device, loss_fn=loss_fn,
                       limit_batches=self.common.limit_test_batches, warmup=self.common.latency_warmup,
                       repeats=self.common.latency_repeats, num_threads=self.common.num_threads,
                       size_bytes=checkpoint_bytes(checkpoint), seed=self.common.seed)

    def context(self, index: int, label: str, teacher: nn.Module, loss_fn, pending: list[dict]) -> NodeContext:
        node_dir = self.node_dir(index + 1, self.setup.nodes[index].kind)

        def save_intermediate(model: nn.Module, tag: str) -> None:
            save_checkpoint(model, node_dir.parent / f"{node_dir.name}.{tag}", self.transforms + pending)

        train, val, test = _loaders(self.datamodule)
        return NodeContext(
            train_loader=train, val_loader=val, test_loader=test,
            loss_fn=loss_fn, device=self.device, teacher=teacher, output_dir=node_dir.with_name(f".{node_dir.name}.work"),
            common=self.common, node_index=index, node_label=label, executor=self.executor,
            logger=lambda metrics, step=None: self.hooks.on_log(self.info, index, self.setup.nodes[index], metrics, step),
            structure_recorder=lambda name, data: pending.append(transform_record(name, data)),
            checkpointer=save_intermediate,
        )


def run(setup: Setup, model: nn.Module, datamodule: Any, *, loss: Any = None, conf_loss: Any = None,
        output_dir: str | Path = "composition_results", model_name: Optional[str] = None, resume: bool = False,
        hooks: Sequence[Hook] = (), executor: Any = None, config: Optional[dict] = None) -> RunResult:
    """Run a resolved ``setup`` on ``model`` and ``datamodule``; see the package README for the results layout.

    The input ``model`` is never modified: the chain works on a copy. Callers build the run with
    ``building.build_run`` (which resolves and validates the setup once).
    """
    if not isinstance(setup, Setup):
        raise TypeError(f"engine.run takes a Setup (got {type(setup).__name__}); building.resolve_setup makes one")
    r = _Run(setup, datamodule, loss=loss, conf_loss=conf_loss, root=Path(output_dir), model_name=model_name,
             hooks=hooks, executor=executor, config=config)
    loss_fn = find_loss(model, loss, conf_loss)
    r.transforms = applied_transforms(model)  # a compressed start point (pretrained=) keeps its history
    start_index = 0
    if resume and r.final_dir.exists() and not r.dir.exists():
        log.info("%s already completed; nothing to resume", r.final_dir)
        rows = read_json(r.final_dir / "metrics.json", [])
        return RunResult(load_model(r.final_dir / "final", copy.deepcopy(model)), rows, r.final_dir, setup)
    if resume and r.dir.exists():
        start_index, teacher, current = _restore(r, model)
    else:
        if r.dir.exists():
            log.warning("discarding the unfinished run in %s (pass resume=true to continue it)", r.dir)
            shutil.rmtree(r.dir)
        (r.dir / "nodes").mkdir(parents=True)
        teacher = copy.deepcopy(model).eval()
        current = copy.deepcopy(model)
        r.run_json = {"status": "running", "setup": setup.name, "run_name": r.final_dir.name,
                      "setup_hash": _setup_hash(setup), "started_at": _now(), "finished_at": None,
                      "completed_nodes": 0, "total_nodes": len(setup.nodes), "error": None}
        write_text(r.dir / "config.yaml", _to_yaml(r.config))
    r.info.resumed = start_index > 0 or resume
    r.write_run_json(status="running")
    r.hooks.before_run(r.info)
    index: Optional[int] = None
    try:
        if start_index == 0 and not r.rows:
            checkpoint = save_checkpoint(current, r.node_dir(0, "input"), r.transforms, {"node": "input"})
            r.rows.append({"node_index": 0, "node": "input", "kind": "input", **r.measure_row(current, checkpoint, loss_fn)})
            write_metrics(r.dir, r.rows)
            r.hooks.after_measure_input(r.info, r.rows[0], checkpoint)
        for index in range(start_index, len(setup.nodes)):
            current = _run_node(r, index, current, teacher, loss_fn)
    except BaseException as err:
        node = setup.nodes[index] if index is not None else None
        r.write_run_json(status="failed", finished_at=_now(), error=f"{type(err).__name__}: {err}")
        r.hooks.on_error(r.info, index, node, err)
        r.write_run_json()  # keep what hooks learned by now in the state (e.g. a tracking run id, for resume)
        if isinstance(err, FedcoreError) and index is not None:
            _add_resume_hint(err, r, index)
        raise
    link_or_copy_tree(r.node_dir(len(setup.nodes), setup.nodes[-1].kind), r.dir / "final")
    r.write_run_json(status="completed", finished_at=_now())
    finalize_folder(r.dir, r.final_dir)
    r.info.output_dir = r.final_dir
    result = RunResult(current, r.rows, r.final_dir, setup)
    r.hooks.after_run(r.info, result)
    return result


def _add_resume_hint(err: FedcoreError, r: _Run, index: int) -> None:
    err.args = (f"{err.args[0] if err.args else err}  [results so far in {r.dir}; after fixing, rerun with "
                f"resume=true to continue from node {index} ({r.setup.nodes[index].kind})]",)


def _run_node(r: _Run, index: int, model: nn.Module, teacher: nn.Module, loss_fn) -> nn.Module:
    node = r.setup.nodes[index]
    spec = get_node(node.kind)
    label = f"{index}:{node.label}"
    pending: list[dict] = []
    ctx = r.context(index, label, teacher, loss_fn, pending)
    r.hooks.before_node(r.info, index, node)
    log.info("node %s (%d/%d) ...", label, index + 1, len(r.setup.nodes))
    seed_everything(r.common.seed + index + 1)
    start = time.perf_counter()
    model = spec.apply(model.to(runtime_device(model, r.device)), node, ctx)
    wall = time.perf_counter() - start
    r.transforms.extend(pending)
    mark_transforms(model, r.transforms)
    folder = save_checkpoint(model, r.node_dir(index + 1, node.kind), r.transforms,
                             {"node": node.label, "kind": node.kind, "config": node.model_dump(mode="json")},
                             **ctx.checkpoint_options)
    work = ctx.output_dir
    if work.exists():  # files a node wrote (decompose_config, pruning history...) go beside its checkpoint
        for item in work.iterdir():
            shutil.move(str(item), folder / item.name)
        work.rmdir()
    row = {"node_index": index + 1, "node": node.label, "kind": node.kind, **r.measure_row(model, folder, loss_fn),
           "wall_s": wall, **({"note": "; ".join(ctx.notes)} if ctx.notes else {})}
    r.rows.append(row)
    write_metrics(r.dir, r.rows)
    r.write_run_json(completed_nodes=index + 1)
    r.hooks.after_node(r.info, index, node, model, row, folder)
    log.info("node %s done in %.1fs", label, wall)
    return model


def _restore(r: _Run, model: nn.Module) -> tuple[int, nn.Module, nn.Module]:
    """Continue an interrupted run: reload its rows, teacher and the last finished node's model."""
    r.run_json = read_json(r.dir / "run.json", {})
    if r.run_json.get("setup_hash") != _setup_hash(r.setup):
        raise FedcoreError(f"cannot resume {r.dir}: the setup differs from the interrupted run's; "
                           f"run without resume=true to start over")
    r.info.state = r.run_json.get("state", {})
    done = int(r.run_json.get("completed_nodes", 0))
    r.rows = [row for row in read_json(r.dir / "metrics.json", []) if row["node_index"] <= done]
    teacher = load_model(r.node_dir(0, "input"), copy.deepcopy(model)) if (r.node_dir(0, "input")).exists() \
        else copy.deepcopy(model).eval()
    if done == 0:
        return 0, teacher, copy.deepcopy(model)
    last = r.node_dir(done, r.setup.nodes[done - 1].kind)
    r.transforms = read_manifest(last)["transforms"]
    current = load_model(last, copy.deepcopy(model))
    log.info("resuming %s after node %d of %d", r.dir, done, len(r.setup.nodes))
    return done, teacher, current
