"""``fedcore-adapter fit-target`` (the seed's ``fc_fit_target``): compress, then test, on every fold.

For each id in ``fold_list`` the config is resolved with ``fold_id`` set (data
configs read it as ``${fold_id}``), the setup runs into
``{output_dir}/{SETUP}[_{model_name}]_fold{id}``, and the compressed model is
measured on the fold's test split with the engine's measuring function.
Per-fold test metrics and their mean go to
``embedding_validation_results.output_path`` (default
``{output_dir}/{SETUP}[_{model_name}]_fit_target.json``).
"""
from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any, Optional

from ..api import extract_loss, fedcore_fit, provides, resolve_loss
from ..building import build_data, build_model, instantiate_target
from ..composition import run_hydra_app
from ..data import resolve_device, runtime_device
from ..errors import ConfigError, DataError
from ..losses import find_loss
from ..metrics import measure
from ..results import write_json
from .common import command_setup, fit_options, plain, reporting_errors, results_folder

RESULTS_SUFFIX = "_fit_target.json"


def fold_ids(spec: Any) -> list[int]:
    """``fold_list`` as a list of ints: a list, or a ``{_target_: ...}`` that builds one (e.g. builtins.range)."""
    if isinstance(spec, dict) and "_target_" in spec:
        spec = instantiate_target("fold_list", spec)
    try:
        folds = [int(f) for f in spec]
    except (TypeError, ValueError):
        raise ConfigError(f"fold_list={spec!r} must be a non-empty list of fold ids (ints)") from None
    if not folds:
        raise ConfigError("fold_list is empty; give at least one fold id, e.g. fold_list=[0]")
    return folds


def _with_fold(raw: dict, fold: int) -> dict:
    from omegaconf import OmegaConf

    conf = OmegaConf.create(raw)
    conf.fold_id = fold
    return OmegaConf.to_container(conf, resolve=True)


def test_scores(result: Any, dm: Any, loss: Any, common: Any) -> dict:
    """The compressed model measured on ``dm.test_dataloader()``: ``test_accuracy``, ``test_loss`` and its costs."""
    model = result.optimised_model
    device = runtime_device(model, resolve_device(common.device))
    row = measure(model.to(device), dm.test_dataloader(), device=device, loss_fn=find_loss(model, loss),
                  limit_batches=common.limit_test_batches, warmup=common.latency_warmup,
                  repeats=common.latency_repeats, num_threads=common.num_threads)
    scores = {f"test_{k}": row[k] for k in ("accuracy", "loss") if row.get(k) is not None}
    scores.update({k: row[k] for k in ("params", "macs", "size_mb", "latency_ms_per_sample", "throughput_sps")})
    return scores


def run_fit_target(cfg: Any) -> dict:
    """Run every fold of a fit-target config; returns (and writes) ``{setup, folds: [...], mean: {...}}``."""
    raw = plain(cfg, resolve=False)
    first = _with_fold(raw, 0)
    folds = fold_ids(first.get("fold_list", [0]))
    setup = command_setup(first)
    name = setup.name
    save_path = results_folder(first, name)
    validation = first.get("embedding_validation_results") or {}
    out_path = Path(str(validation.get("output_path") or f"{save_path}{RESULTS_SUFFIX}"))
    results = []
    for fold in folds:
        fold_cfg = _with_fold(raw, fold)
        model = build_model(fold_cfg, setup.common.seed)
        dm = build_data(fold_cfg)
        if not provides(dm, "test_dataloader"):
            raise DataError(f"fit-target tests every fold on test_dataloader(); data module {type(dm).__name__} "
                            f"has none")
        loss = extract_loss(model, fold_cfg)
        fit = fedcore_fit(model, dm, setup, loss=loss, **fit_options(fold_cfg, Path(f"{save_path}_fold{fold}")))
        scores = test_scores(fit, dm, resolve_loss(loss), fit.setup.common)
        print(f"fold {fold}: " + ", ".join(f"{k}: {v:.4g}" for k, v in scores.items()))
        results.append({"fold_id": fold, "model_name": validation.get("model_name"),
                        "feature_name": validation.get("feature_name"), "results_folder": str(fit.output_dir),
                        "scores_test": scores})
    keys = [k for k in results[0]["scores_test"] if all(k in r["scores_test"] for r in results)]
    mean = {k: statistics.fmean(r["scores_test"][k] for r in results) for k in keys}
    summary = {"setup": name, "folds": results, "mean": mean}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, summary)
    summary["output_path"] = str(out_path)
    return summary


def _task(cfg) -> Optional[float]:
    logging.getLogger("fedcore_adapter").setLevel(logging.INFO)
    summary = reporting_errors(cfg, lambda: run_fit_target(cfg))
    for key, value in summary["mean"].items():
        values = ", ".join(f"{r['scores_test'][key]:.4g}" for r in summary["folds"])
        print(f"Test {key:22}: {value:.4g} [{values}]")
    print(f"results: {summary['output_path']}")
    return summary["mean"].get("test_accuracy")


def main(argv: list[str]) -> None:
    run_hydra_app(_task, "fit_target", argv)
