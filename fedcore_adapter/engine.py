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
import re
import shutil
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .checkpoint import (applied_transforms, checkpoint_bytes, link_or_copy_tree, load_model, mark_transforms,
                         read_manifest, save_checkpoint, write_json)
from .context import NodeContext, SequentialExecutor
from .data import make_loader, provides, resolve_device, runtime_device
from .errors import DataError, FedcoreError, RunError, error_line
from .hooks import Hook, HookList, RunInfo
from .losses import find_loss
from .metrics import measure
from .placement import Heartbeat, finish, now_iso, place
from .registry import get_node
from .results import read_json, run_folder_name, write_metrics, write_text
from .schema import Setup
from .signals import RESUME_COMMAND, RunInterrupted, signal_of, signals_deferred, sigterm_interrupts
from .structure import transform_record

log = logging.getLogger("fedcore_adapter")


@dataclass
class RunResult:
    model: nn.Module
    metrics: list[dict]
    output_dir: Path
    setup: Setup
    status: str = "completed"


_now = now_iso


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
    for step, call in (("prepare_data()", lambda: datamodule.prepare_data()),
                       ("setup('fit')", lambda: datamodule.setup("fit"))):
        if callable(getattr(datamodule, step.split("(")[0], None)):
            try:
                call()
            except FedcoreError:
                raise
            except Exception as err:  # noqa: BLE001 - user code: one line, the original as __cause__
                raise RunError(f"data module {name}: {step} failed: {error_line(err, typed=True)}; fix the data module "
                               f"(debug=true shows the traceback)") from err


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

    def __init__(self, setup: Setup, datamodule: Any, *, loss: Any, conf_loss: Any, model_name: Optional[str],
                 hooks: Sequence[Hook], executor: Any, config: Optional[dict]):
        self.setup = setup
        self.common = setup.common
        self.name = run_folder_name(setup.name, model_name)
        _check_datamodule(datamodule)
        self.datamodule = datamodule
        self.device = resolve_device(self.common.device)
        self.loss, self.conf_loss = loss, conf_loss
        self.hooks = HookList(hooks)
        self.executor = executor or SequentialExecutor()
        self.config = config if config is not None else {"setup": setup.to_dict()}
        self.rows: list[dict] = []
        self.transforms: list[dict] = []
        self.run_json: dict = {}
        self.current_work: Optional[Path] = None
        self.training_cache: Any = None
        self.first_node = 0  # the index in a longer chain of this chain's first node (its seed)
        self._json_lock = threading.Lock()

    def use_folder(self, final: Path, partial: Path) -> None:
        self.final_dir, self.dir = final, partial
        self.info = RunInfo(setup=self.setup, output_dir=self.dir, run_name=final.name, config=self.config)

    # -- bookkeeping -------------------------------------------------------------------------------
    def write_run_json(self, **fields: Any) -> None:
        with self._json_lock:
            self.run_json.update(fields, state=self.info.state, heartbeat_at=_now())
            write_json(self.dir / "run.json", self.run_json)

    def node_dir(self, row_index: int, kind: str) -> Path:
        return self.dir / "nodes" / f"{row_index}_{kind}"

    def measure_row(self, model: nn.Module, checkpoint: Path, loss_fn, teacher: Optional[nn.Module] = None) -> dict:
        """The model's metrics row (``metrics.measure``; ``cosine`` to ``teacher``, the model the run started
        from, on unlabeled data)."""
        if not self.common.measure:
            return {}
        device = runtime_device(model, self.device)
        model.to(device)
        train, val, test = _loaders(self.datamodule)
        return measure(model, test or val or train, device=device, loss_fn=loss_fn,
                       limit_batches=self.common.limit_test_batches, warmup=self.common.latency_warmup,
                       repeats=self.common.latency_repeats, num_threads=self.common.num_threads,
                       size_bytes=checkpoint_bytes(checkpoint), seed=self.common.seed, original=teacher)

    def context(self, index: int, label: str, teacher: nn.Module, loss_fn, pending: list[dict]) -> NodeContext:
        node_dir = self.node_dir(index + 1, self.setup.nodes[index].kind)
        self.current_work = node_dir.with_name(f".{node_dir.name}.work")

        def save_intermediate(model: nn.Module, tag: str) -> None:
            save_checkpoint(model, node_dir.parent / f"{node_dir.name}.{tag}", self.transforms + pending)

        train, val, test = _loaders(self.datamodule)
        return NodeContext(
            train_loader=train, val_loader=val, test_loader=test,
            loss_fn=loss_fn, device=self.device, teacher=teacher, output_dir=self.current_work,
            common=self.common, node_index=index, node_label=label, executor=self.executor,
            logger=lambda metrics, step=None: self.hooks.on_log(self.info, index, self.setup.nodes[index], metrics,
                                                                step),
            structure_recorder=lambda name, data: pending.append(transform_record(name, data)),
            checkpointer=save_intermediate, training_cache=self.training_cache,
        )

    def where(self, index: Optional[int]) -> str:
        if index is None:
            return "node input (measuring the input model)"
        return f"node {index}:{self.setup.nodes[index].label}"

    def resume_hint(self, index: Optional[int]) -> str:
        node = f"node {index} ({self.setup.nodes[index].kind})" if index is not None else "the input model"
        return f"results so far in {self.dir}; after fixing, rerun with resume=true to continue from {node}"

    def remove_partial_work(self) -> None:
        """A node's unfinished files (``.<i>_<kind>.work``, half-written ``.tmp`` checkpoints) go."""
        nodes = self.dir / "nodes"
        for path in nodes.iterdir() if nodes.is_dir() else ():
            if path.name.startswith(".") and path.name.endswith((".work", ".tmp")):
                shutil.rmtree(path, ignore_errors=True)


def run(setup: Setup, model: nn.Module, datamodule: Any, *, loss: Any = None, conf_loss: Any = None,
        output_dir: str | Path = "composition_results", model_name: Optional[str] = None, resume: bool = False,
        hooks: Sequence[Hook] = (), executor: Any = None, config: Optional[dict] = None,
        teacher: Optional[nn.Module] = None, training_cache: Any = None, first_node: int = 0) -> RunResult:
    """Run a resolved ``setup`` on ``model`` and ``datamodule``; see the package README for the results layout.

    The input ``model`` is never modified: the chain works on a copy. ``teacher``: the model distillation nodes
    learn from, and rebuild a ``teacher_checkpoint`` on (default: the input model); give it when ``model`` is a
    start point inside a longer chain (e.g. a pruned checkpoint) whose own input model is the teacher.
    ``training_cache``: a :class:`~.training_cache.TrainingCache` the nodes' trainings are restored from when an
    identical one ran before, and written to (the search's trials share one). ``first_node``: the chain is the
    rest of a longer one from its node ``first_node`` (a search trial started from a computed prefix), so node
    ``i`` is seeded as that chain's node ``first_node + i``, as the whole chain would seed it. Callers
    build the run with ``building.build_run`` (which resolves and validates the setup once). The run gets its own folder
    (``placement``): a finished or live run's folder is never replaced. A failure of user code, data,
    model or the file system is raised as :class:`~.errors.RunError` naming the node (the original as
    ``__cause__``); an interrupt (Ctrl-C, SIGTERM) as :class:`~.signals.RunInterrupted` with the resume hint.
    """
    if not isinstance(setup, Setup):
        raise TypeError(f"engine.run takes a Setup (got {type(setup).__name__}); building.resolve_setup makes one")
    r = _Run(setup, datamodule, loss=loss, conf_loss=conf_loss, model_name=model_name, hooks=hooks,
             executor=executor, config=config)
    r.training_cache, r.first_node = training_cache, first_node
    loss_fn = find_loss(model, loss, conf_loss)
    r.transforms = applied_transforms(model)  # a compressed start point (pretrained=) keeps its history
    with sigterm_interrupts():
        placed = place(Path(output_dir), r.name, resume=resume, setup_hash=_setup_hash(setup))
        if placed.completed is not None:
            log.info("%s already completed; nothing to resume", placed.completed)
            rows = read_json(placed.completed / "metrics.json", [])
            return RunResult(load_model(placed.completed / "final", copy.deepcopy(model)), rows, placed.completed,
                             setup)
        r.use_folder(placed.final, placed.partial)
        r.run_json = read_json(r.dir / "run.json", {})
        with Heartbeat(lambda: r.write_run_json()):
            return _execute(r, model, loss_fn, resumed=placed.resume, teacher=teacher)


def _execute(r: _Run, model: nn.Module, loss_fn, resumed: bool, teacher: Optional[nn.Module] = None) -> RunResult:
    given_teacher = copy.deepcopy(teacher).eval() if teacher is not None else None
    setup = r.setup
    start_index, index = 0, None
    if resumed:
        try:
            start_index, current = _restore(r, model)
            teacher = given_teacher if given_teacher is not None else _saved_input(r, model)
        except BaseException:
            write_json(r.dir / "run.json", {**r.run_json, "status": r.run_json.get("previous_status") or "failed"})
            raise
    try:
        if not resumed:
            teacher = given_teacher if given_teacher is not None else copy.deepcopy(model).eval()
            current = copy.deepcopy(model)
            r.run_json.update({"setup": setup.name, "finished_at": None, "completed_nodes": 0,
                               "total_nodes": len(setup.nodes), "error": None})
            write_text(r.dir / "config.yaml", _to_yaml(r.config))
        r.info.resumed = start_index > 0 or resumed
        r.write_run_json(status="running")
        r.hooks.before_run(r.info)
        if start_index == 0 and not r.rows:
            checkpoint = save_checkpoint(current, r.node_dir(0, "input"), r.transforms, {"node": "input"})
            r.rows.append({"node_index": 0, "node": "input", "kind": "input",
                           **r.measure_row(current, checkpoint, loss_fn, teacher)})
            write_metrics(r.dir, r.rows)
            r.hooks.after_measure_input(r.info, r.rows[0], checkpoint)
        for index in range(start_index, len(setup.nodes)):
            current = _run_node(r, index, current, teacher, loss_fn)
        link_or_copy_tree(r.node_dir(len(setup.nodes), setup.nodes[-1].kind), r.dir / "final")
        r.write_run_json(status="completed", finished_at=_now())
    except KeyboardInterrupt as err:
        raise _interrupted(r, index, err) from None
    except BaseException as err:  # noqa: BLE001 - recorded as failed, then raised again
        raise _failed(r, index, err)  # noqa: B904 - _failed sets the cause (or re-raises err itself)
    final = finish(r.dir, r.final_dir)
    r.info.output_dir = final
    if final != r.final_dir:
        log.warning("%s was taken meanwhile; the results are in %s", r.final_dir, final)
    result = RunResult(current, r.rows, final, setup)
    r.hooks.after_run(r.info, result)
    return result


# What to do, for causes users meet most (matched on the original message); the default: the generic advice.
_ADVICE = [
    (r"num_samples should be a positive integer", "a data loader's dataset is empty; give the data module data "
                                                   "for every split the run uses"),
    (r"batch_size should be a positive integer", "batch_size must be 1 or more"),
    (r"(size|shape|dimension)s? .*(match|must|mismatch|expected)|mat1 and mat2|Expected input batch_size|"
     r"target .*(expected|out of bounds|size)|multi-target|out of bounds",
     "the model's outputs and the targets do not fit the loss: check the "
     "model's output size, the targets' shape and dtype, and loss._target_"),
    (r"No space left|Read-only file system|Permission denied|Disk quota", "free space or choose a writable output_dir"),
]


def _advice(err: BaseException) -> str:
    text = str(err)
    for pattern, advice in _ADVICE:
        if re.search(pattern, text, flags=re.IGNORECASE):
            return advice
    return "fix the model, data or setup it names"


def _failed(r: _Run, index: Optional[int], err: BaseException) -> BaseException:
    """Record the failure (run.json ``failed``, hooks) and return the error to raise: FedcoreErrors keep their
    class with the resume hint; other exceptions become a RunError naming the node (original as ``__cause__``)."""
    node = r.setup.nodes[index] if index is not None else None
    if isinstance(err, FedcoreError):
        message = str(err.args[0] if err.args else err)
        out: BaseException = err
    elif isinstance(err, Exception):
        message = (f"{r.where(index)} failed: {error_line(err, typed=True)}; {_advice(err)} "
                   f"(debug=true shows the traceback)")
        out = RunError(message, node=r.where(index))
        out.__cause__, out.__suppress_context__ = err, True
    else:  # SystemExit, GeneratorExit...: not ours to rephrase
        message, out = error_line(err, typed=True), err
    r.remove_partial_work()
    try:
        r.write_run_json(status="failed", finished_at=_now(), error=message,
                         traceback="".join(traceback.format_exception(err)))
    except OSError as write_err:  # the file system may be what failed
        log.warning("could not mark %s failed: %s", r.dir, write_err)
    r.hooks.on_error(r.info, index, node, err)
    try:
        r.write_run_json()  # keep what hooks learned by now in the state (e.g. a tracking run id, for resume)
    except OSError:
        pass
    if isinstance(out, FedcoreError):
        out.args = (f"{message}  [{r.resume_hint(index)}]",)
    return out


def _interrupted(r: _Run, index: Optional[int], err: KeyboardInterrupt) -> BaseException:
    """Clean up after Ctrl-C / SIGTERM: partial work removed, run.json ``interrupted``, hooks told; the one line."""
    signum = signal_of(err)
    node = r.setup.nodes[index] if index is not None else None
    command = (RESUME_COMMAND.get()
               or "rerun with resume=true (run_setup(..., resume=True) / fedcore_fit(..., resume=True))")
    message = (f"interrupted by {signal.Signals(signum).name} during {r.where(index)}; results so far in {r.dir}; "
               f"resume with: {command}")
    with signals_deferred():
        r.remove_partial_work()
        try:
            r.write_run_json(status="interrupted", finished_at=_now(), error=message, resume_command=command)
        except OSError as write_err:
            log.warning("could not mark %s interrupted: %s", r.dir, write_err)
        r.hooks.on_interrupt(r.info, index, node, signum)
        try:
            r.write_run_json()
        except OSError:
            pass
    return RunInterrupted(message, signum)


def _run_node(r: _Run, index: int, model: nn.Module, teacher: nn.Module, loss_fn) -> nn.Module:
    node = r.setup.nodes[index]
    spec = get_node(node.kind)
    label = f"{index}:{node.label}"
    pending: list[dict] = []
    ctx = r.context(index, label, teacher, loss_fn, pending)
    r.hooks.before_node(r.info, index, node)
    log.info("node %s (%d/%d) ...", label, index + 1, len(r.setup.nodes))
    seed_everything(r.common.seed + r.first_node + index + 1)
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
    row = {"node_index": index + 1, "node": node.label, "kind": node.kind,
           **r.measure_row(model, folder, loss_fn, teacher), "wall_s": wall,
           **({"note": "; ".join(ctx.notes)} if ctx.notes else {})}
    r.rows.append(row)
    write_metrics(r.dir, r.rows)
    r.write_run_json(completed_nodes=index + 1)
    r.hooks.after_node(r.info, index, node, model, row, folder)
    log.info("node %s done in %.1fs", label, wall)
    return model


def _saved_input(r: _Run, model: nn.Module) -> nn.Module:
    """The interrupted run's input model (its teacher), as saved in its folder."""
    folder = r.node_dir(0, "input")
    return load_model(folder, copy.deepcopy(model)) if folder.exists() else copy.deepcopy(model).eval()


def _restore(r: _Run, model: nn.Module) -> tuple[int, nn.Module]:
    """Continue an interrupted run: reload its rows and the last finished node's model."""
    if r.run_json.get("setup_hash") != _setup_hash(r.setup):
        raise FedcoreError(f"cannot resume {r.dir}: the setup differs from the interrupted run's; "
                           f"run without resume=true to start over")
    r.info.state = r.run_json.get("state", {})
    r.run_json["resumed_at"] = _now()
    done = int(r.run_json.get("completed_nodes", 0))
    r.rows = [row for row in read_json(r.dir / "metrics.json", []) if row["node_index"] <= done]
    if done == 0:
        return 0, copy.deepcopy(model)
    last = r.node_dir(done, r.setup.nodes[done - 1].kind)
    r.transforms = read_manifest(last)["transforms"]
    current = load_model(last, copy.deepcopy(model))
    log.info("resuming %s after node %d of %d", r.dir, done, len(r.setup.nodes))
    return done, current
