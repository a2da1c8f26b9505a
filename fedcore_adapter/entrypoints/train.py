"""``fedcore-adapter train`` (the seed's ``fc_train``): fit a model through a setup, optionally save it.

Options beyond the main command's: ``limit_train_batches``, ``limit_valid_batches``,
``need_fedot_pretrain``, ``need_evo_opt``, ``save_encoder`` (conf/train.yaml).
Results go to ``{output_dir}/{SETUP}[_{model_name}]``.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import ConfigError
from ..api import extract_loss, fedcore_fit
from ..building import build_data, build_model
from ..composition import run_hydra_app
from .common import STATE_SUFFIXES, command_setup, fit_options, plain, reporting_errors, results_folder


def check_save_target(path: Optional[str]) -> None:
    path = None if path is None else str(path)
    if path and Path(path).suffix.lower() in (*STATE_SUFFIXES, ".p", ".pkl"):
        raise ConfigError(f"save_encoder={path!r}: the model is saved as a checkpoint folder (tensors + manifest, "
                          f"never a pickled module); give a folder path, "
                          f"e.g. save_encoder={Path(path).with_suffix('')}")


def save_model_folder(result: Any, path: str | Path) -> Path:
    """Copy the run's final checkpoint to ``path`` (atomically); ``load_model(path, fresh_model)`` rebuilds it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(result.output_dir) / "final", tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def run_train(cfg: Mapping[str, Any]):
    """Run a train command's config; returns the ``FedcoreFitResult``."""
    cfg = plain(cfg)
    check_save_target(cfg.get("save_encoder"))
    setup = command_setup(cfg)
    model = build_model(cfg, setup.common.seed)
    dm = build_data(cfg)
    result = fedcore_fit(model, dm, setup, loss=extract_loss(model, cfg),
                         **fit_options(cfg, results_folder(cfg, setup.name)))
    if cfg.get("save_encoder"):
        save_model_folder(result, str(cfg["save_encoder"]))
    return result


def _task(cfg) -> Optional[float]:
    logging.getLogger("fedcore_adapter").setLevel(logging.INFO)
    result = reporting_errors(cfg, lambda: run_train(cfg))
    print(result.summary())
    print(f"results: {result.output_dir}")
    if cfg.get("save_encoder"):
        print(f"model saved: {cfg.save_encoder}")
    accuracy = result.metrics[-1].get("accuracy")
    return accuracy if isinstance(accuracy, float) else None


def main(argv: list[str]) -> None:
    run_hydra_app(_task, "train", argv)
