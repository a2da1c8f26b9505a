"""One trial, where it runs (a Dask worker or this process): a real run of its chain, started from the
cached checkpoint of its longest computed prefix, stopped early when it stays below the constraint.

The payload is plain and picklable: ``setup`` (a mapping), ``cfg`` (the composed config: model, data,
loss, tracking...), ``start`` (a checkpoint folder or null: the input model), ``output_dir``, and
``early_stop`` (where the fidelity study is, which trial reports to it, the pruner's settings), ``first_node``
(the index of its first node in the whole chain: nodes are seeded by that index, and the run's own seed is the
search's, so every trial of a chain seeds and validates as its whole chain would), ``training_cache`` (where
trainings are restored from). The Python API may add ``model`` / ``data`` / ``loss`` objects instead of the
config's ``_target_``s.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import optuna

from ..building import build_data, build_model, build_run, load_pretrained, resolve_setup, tracking_hooks
from ..data import first_batch, make_loader, model_device, split_batch
from ..errors import error_line
from ..hooks import Hook
from ..losses import find_loss
from ..metrics import evaluate
from ..progress import node_work
from ..results import PARTIAL_SUFFIX, read_json, write_json
from ..trainer import REUSED
from ..training_cache import TrainingCache


ENTRY_FILE = "early_stop.json"  # beside a node's checkpoint: the validation accuracy it ended with


class TrialStopped(BaseException):
    """Raised from a hook to end a run early (a BaseException: hooks' own failures are Exceptions, swallowed)."""


def open_storage(path: str | Path) -> Any:
    """The study's storage: an Optuna journal file (safe for several processes on one file system)."""
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def fidelity_pruner(spec: Mapping[str, Any]) -> Any:
    """Stop when a node ends with validation accuracy ``margin`` below the constraint line, after ``patience``
    more node ends without improvement (optuna's ThresholdPruner, wrapped in its PatientPruner)."""
    threshold = optuna.pruners.ThresholdPruner(lower=spec["lower"], n_warmup_steps=0)
    if not spec.get("patience"):
        return threshold
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.PatientPruner(threshold, patience=spec["patience"])


class EarlyStopHook(Hook):
    """Reports the validation quality (the spec's ``quality``: accuracy by default) of each node's last epoch (the
    model the node hands on) to the trial's fidelity twin when the node ends; stops the run when pruned, before
    the next node. A node without epochs reports nothing, nor does the last node (the trial is complete then, and
    judged as such).

    Each finished node's epoch curve (and each epoch's training phase) is kept on the fidelity twin (``curves``).
    Inside a node (``within_nodes``: ``all`` epochs, or only its ``final_phase``, the fine-tune after its last
    structural step), a running node's epoch ``k`` is judged with the largest gain from epoch ``k`` to the end that
    finished nodes of the same kind and epochs showed (at least ``min_curves`` of them, this search's trials). The
    trial stops at the second epoch in a row whose accuracy plus that gain is below ``lower``: even the best
    recovery seen would leave it infeasible.

    A node end that a node of a kind in ``recovered_by`` follows (a distillation) is judged with the largest
    recovery such nodes showed (:func:`recovery_gain`), and not at all before ``min_curves`` of them finished. Each
    node end's accuracy is also written beside its checkpoint (``ENTRY_FILE``): a trial started from that
    checkpoint (a computed prefix) knows the accuracy its first node started from."""

    def __init__(self, spec: Mapping[str, Any]):
        self.spec = dict(spec)
        self.step = 0  # node ends reported
        self.epochs = 0  # epochs run (the trial's cost)
        self.reused = 0  # epochs restored from an identical earlier training (not run)
        self.quality = str(self.spec.get("quality", "accuracy"))  # the metric judged (higher better)
        self.last: Optional[float] = None  # the last validation quality reported
        self.last_loss: float | None = None  # the validation loss of the same epoch
        self._node_last: Optional[float] = None  # the running node's latest epoch
        self._node_loss: float | None = None
        self._trial = None
        self._curve: list[float] = []  # the running node's validation accuracy per epoch
        self._phases: list[str] = []  # per epoch: its training phase (the metric's prefix: ``finetune_3``...)
        self._key = ""  # its kind and epochs: the curves it is compared with
        self._gain: Optional[list[Optional[float]]] = None  # per epoch judged: the largest gain to the end seen
        self._entry: Optional[float] = None  # the accuracy the running node started from (None: not known)
        self._ends: dict[int, float] = {}  # node index -> the validation accuracy it ended with

    def trial(self) -> Any:
        if self._trial is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.load_study(study_name=self.spec["study"], storage=open_storage(self.spec["storage"]),
                                      pruner=fidelity_pruner(self.spec))
            self._trial = optuna.trial.Trial(study, self.spec["trial_id"])
        return self._trial

    def before_node(self, run: Any, index: int, node: Any) -> None:
        self._node_last = self._node_loss = None
        self._curve, self._phases = [], []
        self._key = f"{node.kind}:{node_work(node)}"  # the kind and its epoch settings
        self._entry = self._ends.get(index - 1) if index else start_quality(self.spec.get("start"), self.quality)
        mode = within_mode(self.spec)
        self._gain = None if mode == "off" else \
            judged_epochs(self._curves(), self._key, mode, int(self.spec.get("min_curves", 3)))

    def _curves(self) -> list[dict]:
        """The finished nodes' curves of this search's trials (their fidelity twins' ``curves``)."""
        trials = self.trial().study.get_trials(deepcopy=False)
        return [c for t in trials for c in t.user_attrs.get("curves", [])]

    def on_log(self, run: Any, index: int, node: Any, metrics: dict, step: Optional[int]) -> None:
        column = f"val_{self.quality}"
        key, value = next(((k, v) for k, v in metrics.items() if k.endswith(column)
                           and isinstance(v, (int, float))), (None, None))
        if value is None:
            return
        self._node_last = float(value)
        self._node_loss = next((float(v) for k, v in metrics.items() if k.endswith("val_loss")
                                and isinstance(v, (int, float))), None)
        reused = next((v for k, v in metrics.items() if k.endswith(REUSED)), None)
        if reused is not None:  # a training restored, not run: where it ended, no epoch run
            self.reused += int(reused)
            return
        self._phases.append(key[:-len(column)].rstrip("_/"))
        self.epochs += 1
        self._curve.append(float(value))
        k = len(self._curve) - 1
        if unrecoverable(self._curve, self._gain, self.spec["lower"]):
            raise TrialStopped(f"validation {self.quality} {value:.4f} at epoch {k + 1} of {len(self._gain)} of node "
                               f"{index}: {node.kind} (after {self.epochs} epochs): with the largest recovery a "
                               f"finished {node.kind} node showed from there (+{self._gain[k]:.4f}) still below "
                               f"{self.spec['lower']:.4f}")

    def after_node(self, run: Any, index: int, node: Any, model: Any, row: dict, checkpoint: Path) -> None:
        value, loss, self._node_last, self._node_loss = self._node_last, self._node_loss, None, None
        if value is None:
            return
        self._ends[index] = value
        if checkpoint is not None:  # a trial started from this checkpoint knows where its first node started
            write_json(Path(checkpoint) / ENTRY_FILE, {f"val_{self.quality}": value, "val_loss": loss})
        trial = self.trial()  # every node's curve is kept: judged inside nodes, or replayed after the search
        trial.set_user_attr("curves", [*trial.user_attrs.get("curves", []),
                                       {"key": self._key, "kind": node.kind, "node": index, "values": self._curve,
                                        "phases": self._phases, "entry": self._entry, "end": value,
                                        "epochs": node_work(node) - 1}])
        if index >= len(run.setup.nodes) - 1:  # the last node: the trial completes and is judged
            return
        self.step += 1
        self.last, self.last_loss = value, loss
        trial.report(value, self.step)
        lower, after = self.spec["lower"], run.setup.nodes[index + 1]
        where = (f"validation {self.quality} {value:.4f} at the end of node {index}: {node.kind} "
                 f"(after {self.epochs} epochs)")
        if after.kind in self.spec.get("recovered_by", ()):
            epochs = node_work(after) - 1
            gain = recovery_gain(self._curves(), after.kind, epochs, lower, int(self.spec.get("min_curves", 3)))
            if gain is not None and value + gain < lower:
                raise TrialStopped(f"{where}: with the largest recovery a finished {after.kind} node of {epochs}+ "
                                   f"epochs showed (+{gain:.4f}) still below {lower:.4f}")
        elif trial.should_prune():
            raise TrialStopped(f"{where} below {lower:.4f}")


def recovery_gain(curves: list[dict], kind: str, epochs: int, lower: float, min_curves: int) -> Optional[float]:
    """How a node end that a node of ``kind`` and ``epochs`` follows is judged: the largest gain from its entry to
    its end (at least 0) that finished nodes of ``kind`` of at least those epochs showed from an entry below
    ``lower`` (ones the plain node-end rule would have stopped); None, not judged, with fewer than ``min_curves``
    of them. Curves without an entry (the node started a trial from the shared prefix, or followed a node without
    epochs) do not count."""
    gains = [c["end"] - c["entry"] for c in curves if c.get("kind") == kind and c.get("entry") is not None
             and c["entry"] < lower and c.get("end") is not None and c.get("epochs", 0) >= epochs]
    return max(0.0, *gains) if len(gains) >= min_curves else None


def start_quality(checkpoint: Optional[str | Path], quality: str = "accuracy") -> Optional[float]:
    """The validation ``quality`` a trial's start checkpoint ended its node with (its ``ENTRY_FILE``); None when
    the checkpoint was not a judged node's (the shared prefix) or there is none."""
    if not checkpoint:
        return None
    value = read_json(Path(checkpoint) / ENTRY_FILE, {}).get(f"val_{quality}")
    return float(value) if isinstance(value, (int, float)) else None


def within_mode(spec: Mapping[str, Any]) -> str:
    """``off``, ``final_phase``, ``phase_ends`` or ``all`` (``within_nodes`` as configured; a bool means off /
    all, as ``EarlyStop`` reads it)."""
    mode = spec.get("within_nodes") or "off"
    return "all" if mode is True else str(mode)


def judged_epochs(curves: list[dict], key: str, mode: str, min_curves: int) -> Optional[list[Optional[float]]]:
    """How a running node of ``key`` is judged inside: per epoch, the largest gain to the node's end that finished
    nodes showed (``largest_gains``), or None where the epoch is not judged; None: nothing is judged. ``all``:
    every epoch; ``final_phase``: the epochs of the last training phase the finished nodes ran (after the last
    pruning step, or a low-rank truncation), where no structural step dips the accuracy any more;
    ``phase_ends``: those and the last epoch of each earlier phase (a step's fine-tune has recovered by then)."""
    if mode == "off":
        return None
    gain = largest_gains(curves, key, min_curves)
    if gain is None or mode == "all":
        return gain
    phases = next((c["phases"] for c in curves if c.get("key") == key and len(c.get("phases") or ()) == len(gain)),
                  None)
    if not phases:  # curves without phases (an older study): nothing is judged
        return None
    final = phases.index(phases[-1])
    judged = [k >= final or (mode == "phase_ends" and phases[k + 1] != phases[k]) for k in range(len(gain))]
    return [g if j else None for g, j in zip(gain, judged)]


def unrecoverable(curve: list[float], gain: Optional[list[Optional[float]]], lower: float) -> bool:
    """The running node's last epoch and the judged epoch before it (``gain`` not None; the node's last epoch is
    judged at the node's end) are both below ``lower`` even with the largest gain seen from each to the end."""
    k = len(curve) - 1
    if gain is None or k >= len(gain) - 1 or gain[k] is None:
        return False
    before = next((j for j in range(k - 1, -1, -1) if gain[j] is not None), None)
    return before is not None and all(curve[j] + gain[j] < lower for j in (before, k))


def largest_gains(curves: list[dict], key: str, min_curves: int) -> Optional[list[float]]:
    """Per epoch ``k`` of a node of ``key`` (kind and epoch settings): the largest ``end - curve[k]`` among the
    finished ``curves`` of that key and of its most common length (at least ``min_curves`` of them); None with
    fewer, or for nodes of one epoch."""
    same = [c["values"] for c in curves if c.get("key") == key and len(c.get("values", ())) > 1]
    if not same:
        return None
    length = Counter(len(c) for c in same).most_common(1)[0][0]
    same = [c for c in same if len(c) == length]
    if len(same) < min_curves:
        return None
    return [max(c[-1] - c[k] for c in same) for k in range(length)]


def _validation(model: Any, data: Any, payload: Mapping[str, Any], cfg: Mapping[str, Any], setup: Any,
                original: Optional[Callable[[], Any]] = None) -> dict:
    """``val_split`` (the data module has a validation loader) and the model's figures on it: ``val_accuracy``,
    ``val_loss``, each quality column its own validation step logs (``val_recall_top_k``...), and on unlabeled
    batches ``val_cosine`` to ``original()``, the search's input model (built only for unlabeled data)."""
    loader = make_loader(data, "val_dataloader")
    if loader is None:
        return {"val_split": False}
    reference = original() if original is not None and split_batch(first_batch(loader, "val_dataloader()"))[1] \
        is None else None
    val = evaluate(model, loader, find_loss(model, payload.get("loss"), cfg.get("loss")), model_device(model),
                   setup.common.limit_valid_batches, original=reference)
    return {"val_split": True, **{f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))},
            "val_accuracy": val.get("accuracy"), "val_loss": val.get("loss"),
            "val_samples": _samples(loader, setup.common.limit_valid_batches)}


def _samples(loader: Any, limit_batches: Optional[int]) -> Optional[int]:
    """How many samples ``loader`` yields (within ``limit_batches``): its dataset's length; None when unknown."""
    try:
        n = len(loader.dataset)
    except (AttributeError, TypeError):
        return None
    size = getattr(loader, "batch_size", None)
    return min(n, limit_batches * size) if limit_batches and size else n


def _input_model(payload: Mapping[str, Any], cfg: Mapping[str, Any], setup: Any) -> Any:
    """The model the trial's chain starts from (the input model: no prefix was run)."""
    model = payload.get("model")
    if model is not None:
        model = copy.deepcopy(model)
        return load_pretrained(model, cfg["pretrained"]) if cfg.get("pretrained") else model
    return build_model(cfg, setup.common.seed)


def _references(folders: list[str], data: Any, payload: Mapping[str, Any], cfg: Mapping[str, Any],
                setup: Any, original: Optional[Callable[[], Any]] = None) -> dict:
    """``{folder: validation facts}`` of each results folder's final model (the named setups' runs), rebuilt
    on the original model and evaluated as the trials are; ``{"error": ...}`` for one that cannot be."""
    out = {}
    for folder in folders:
        try:
            base = copy.deepcopy(payload["model"]) if payload.get("model") is not None \
                else build_model({**cfg, "pretrained": None}, setup.common.seed)
            out[folder] = _validation(load_pretrained(base, folder, "reference run"), data, payload, cfg,
                                      setup, original)
        except Exception as err:  # noqa: BLE001 - a reference that cannot be measured is drawn marked, never fails
            out[folder] = {"error": f"not measured: {error_line(err)}"}
    return out


def run_trial(payload: Mapping[str, Any]) -> dict:
    """Run one trial's chain through the one run-building path; returns small facts: state (complete /
    pruned), the metrics rows (measured on the test split), the results folder, and the final model's
    validation accuracy and loss (``val_accuracy``, ``val_loss``: what the search selects on; ``val_split``
    false when the data module has no validation loader). ``input_val``: also the input model's validation
    accuracy and loss (``input_val_accuracy``, ``input_val_loss``: the reference when no shared prefix was run).
    ``references``: results folders whose final models are evaluated there too (``references``:
    :func:`_references`)."""
    cfg = dict(payload["cfg"])
    setup = resolve_setup(payload["setup"])
    teacher = None
    input_cfg = dict(cfg)  # the search's input model: before a start checkpoint replaces pretrained
    built: list[Any] = []

    def original() -> Any:
        """The search's input model, what ``val_cosine`` compares with (the teacher, when the trial has one);
        built once, when first asked for."""
        if teacher is not None:
            return teacher
        if not built:
            built.append(_input_model(payload, input_cfg, setup))
        return built[0]

    if payload.get("start"):  # as if the whole chain ran: its input model teaches (distillation nodes, unlabeled
        teacher = _input_model(payload, cfg, setup)  # batches; it rebuilds a teacher_checkpoint)
        cfg["pretrained"] = payload["start"]
    hooks = tracking_hooks(cfg, cfg.get("model_name"))
    stopper = EarlyStopHook({**payload["early_stop"], "start": payload.get("start")}) \
        if payload.get("early_stop") else None
    data = payload.get("data")
    if data is None:
        data = build_data(cfg)
    model = payload.get("model")
    if model is not None:  # the Python API's model object: a copy, started where the trial starts
        model = _input_model(payload, cfg, setup)
    out = Path(payload["output_dir"])
    cache = TrainingCache(**payload["training_cache"]) if payload.get("training_cache") else None
    try:
        result = build_run(setup, cfg=cfg, model=model, data=data, loss=payload.get("loss"),
                           output_dir=out, model_name="", hooks=[*hooks, *([stopper] if stopper else [])],
                           teacher=teacher, training_cache=cache, first_node=payload.get("first_node", 0))
    except TrialStopped as stop:
        folder = out / f"{setup.name}{PARTIAL_SUFFIX}"
        facts = {"state": "pruned", "reason": str(stop), "output_dir": str(folder.absolute()),
                 "metrics": read_json(folder / "metrics.json", []), "epochs": stopper.epochs,
                 "epochs_reused": stopper.reused,
                 f"val_{stopper.quality}": stopper.last, "val_loss": stopper.last_loss}
    else:
        facts = {"state": "complete", "output_dir": str(Path(result.output_dir).absolute()),
                 "metrics": result.metrics, "epochs": stopper.epochs if stopper else None,
                 "epochs_reused": stopper.reused if stopper else None,
                 **_validation(result.model, data, payload, cfg, setup, original)}
    if payload.get("input_val"):  # after the run: the data module is set up
        val = _validation(original(), data, payload, cfg, setup, original)  # no start: the input model
        facts.update({f"input_{k}": v for k, v in val.items() if k not in ("val_split", "val_samples")})
    if payload.get("references"):  # the named setups' runs, on the validation split like the trials
        facts["references"] = _references(payload["references"], data, payload, cfg, setup, original)
    return facts
