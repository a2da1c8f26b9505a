"""One trial, where it runs (a Dask worker or this process): a real run of its chain, started from the
cached checkpoint of its longest computed prefix, stopped early when it stays below the constraint.

The payload is plain and picklable: ``setup`` (a mapping), ``cfg`` (the composed config: model, data,
loss, tracking...), ``start`` (a checkpoint folder or null: the input model), ``output_dir``, and
``early_stop`` (where the fidelity study is, which trial reports to it, the pruner's settings). The
Python API may add ``model`` / ``data`` / ``loss`` objects instead of the config's ``_target_``s.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Optional

from ..building import build_data, build_run, load_pretrained, resolve_setup, tracking_hooks
from ..data import model_device
from ..hooks import Hook
from ..losses import find_loss
from ..metrics import evaluate
from ..results import PARTIAL_SUFFIX, read_json


class TrialStopped(BaseException):
    """Raised from a hook to end a run early (a BaseException: hooks' own failures are Exceptions, swallowed)."""


def open_storage(path: str | Path) -> Any:
    """The study's storage: an Optuna journal file (safe for several processes on one file system)."""
    import optuna

    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def fidelity_pruner(spec: Mapping[str, Any]) -> Any:
    """Stop when validation accuracy is ``margin`` below the constraint line and has not improved for
    ``patience`` epochs (optuna's ThresholdPruner wrapped in its PatientPruner)."""
    import warnings

    import optuna

    threshold = optuna.pruners.ThresholdPruner(lower=spec["lower"], n_warmup_steps=spec["warmup_epochs"])
    if not spec["patience"]:
        return threshold
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.PatientPruner(threshold, patience=spec["patience"])


class EarlyStopHook(Hook):
    """Reports every epoch's validation accuracy to the trial's fidelity twin; stops the run when pruned."""

    def __init__(self, spec: Mapping[str, Any]):
        self.spec = dict(spec)
        self.step = 0
        self._trial = None

    def trial(self) -> Any:
        if self._trial is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.load_study(study_name=self.spec["study"], storage=open_storage(self.spec["storage"]),
                                      pruner=fidelity_pruner(self.spec))
            self._trial = optuna.trial.Trial(study, self.spec["trial_id"])
        return self._trial

    def on_log(self, run: Any, index: int, node: Any, metrics: dict, step: Optional[int]) -> None:
        value = next((v for k, v in metrics.items() if k.endswith("val_accuracy") and isinstance(v, (int, float))),
                     None)
        if value is None:
            return
        self.step += 1
        trial = self.trial()
        trial.report(float(value), self.step)
        if trial.should_prune():
            raise TrialStopped(f"validation accuracy {value:.4f} at epoch {self.step} (node {index}: {node.kind}) "
                               f"below {self.spec['lower']:.4f} without improving")


def run_trial(payload: Mapping[str, Any]) -> dict:
    """Run one trial's chain through the one run-building path; returns small facts: state (complete /
    pruned), the metrics rows, the results folder."""
    cfg = dict(payload["cfg"])
    setup = resolve_setup(payload["setup"])
    if payload.get("start"):
        cfg["pretrained"] = payload["start"]
    hooks = tracking_hooks(cfg, cfg.get("model_name"))
    stopper = EarlyStopHook(payload["early_stop"]) if payload.get("early_stop") else None
    model = payload.get("model")
    if model is not None:  # the Python API's model object: a copy, started where the trial starts
        model = copy.deepcopy(model)
        model = load_pretrained(model, cfg["pretrained"]) if cfg.get("pretrained") else model
    out = Path(payload["output_dir"])
    try:
        result = build_run(setup, cfg=cfg, model=model, data=payload.get("data"), loss=payload.get("loss"),
                           output_dir=out, model_name="", hooks=[*hooks, *([stopper] if stopper else [])])
    except TrialStopped as stop:
        folder = out / f"{setup.name}{PARTIAL_SUFFIX}"
        return {"state": "pruned", "reason": str(stop), "output_dir": str(folder.absolute()),
                "metrics": read_json(folder / "metrics.json", []), "epochs": stopper.step}
    facts = {"state": "complete", "output_dir": str(Path(result.output_dir).absolute()), "metrics": result.metrics,
             "epochs": stopper.step if stopper else None}
    if payload.get("reference_val"):  # the validation accuracy early stopping compares with
        data = payload.get("data")
        if data is None:
            data = build_data(cfg)
        loader = data.val_dataloader() if callable(getattr(data, "val_dataloader", None)) else None
        if loader is not None:
            val = evaluate(result.model, loader, find_loss(result.model, payload.get("loss"), cfg.get("loss")),
                           model_device(result.model), setup.common.limit_valid_batches)
            facts["val_accuracy"] = val.get("accuracy")
    return facts
