"""What the train / fit-target / inference commands share.

One-line errors; the results folder ``{output_dir}/{SETUP}[_{model_name}]``; the setup of a command's
config; the seed's options as ``fedcore_fit`` keyword arguments. The model, data module and
``pretrained=`` weights are built by ``building`` (as for every run).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..building import DEFAULT_SETUP, resolve_setup, setup_overrides, tracking_hooks
from ..errors import ConfigError, FedcoreError, error_line
from ..results import run_folder_name
from ..schema import Setup

log = logging.getLogger("fedcore_adapter")
STATE_SUFFIXES = (".pt", ".pth")


def reporting_errors(cfg: Mapping[str, Any], fn: Callable[[], Any]) -> Any:
    """``fn()``; a FedcoreError (or a missing file / package) becomes one line on stderr and exit code 2."""
    try:
        return fn()
    except (FedcoreError, FileNotFoundError, ImportError) as err:
        if cfg.get("debug"):
            raise
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)


def plain(cfg: Any, resolve: bool = True) -> dict:
    """A DictConfig (or mapping) as a plain dict."""
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf
        from omegaconf.errors import MissingMandatoryValue

        try:
            return OmegaConf.to_container(cfg, resolve=resolve, throw_on_missing=True)
        except MissingMandatoryValue as err:
            raise ConfigError(f"{err.full_key} is required (it is ??? in the config); set {err.full_key}=...") from None
    return dict(cfg)


def results_folder(cfg: Mapping[str, Any], setup_name: str) -> Path:
    """``{output_dir}/{setup_name}[_{model_name}]``: where a command's results go."""
    return Path(cfg.get("output_dir") or "composition_results") / run_folder_name(setup_name, cfg.get("model_name"))


def model_label(cfg: Mapping[str, Any]) -> Optional[str]:
    """``model_name`` when given; else None, so that tracking names the model as the main command does (its
    config option, e.g. ``ptls_coles``, else its ``_target_``'s name)."""
    return cfg.get("model_name") or None


def command_setup(cfg: Mapping[str, Any]) -> Setup:
    """The setup of a train / fit-target config: ``cfg.setup`` with its overrides, the seed's batch limits
    (``limit_train_batches`` / ``limit_valid_batches``, FedCore ``batch_limit`` / ``calib_batch_limit``) on top."""
    overrides = setup_overrides(cfg)
    for key in ("limit_train_batches", "limit_valid_batches"):
        if cfg.get(key) is not None:
            overrides["common"][key] = cfg[key]
    return resolve_setup(cfg.get("setup") or DEFAULT_SETUP, overrides)


def fit_options(cfg: Mapping[str, Any], output_folder: Path) -> dict:
    """``fedcore_fit`` keyword arguments from a command's config (its setup comes from :func:`command_setup`)."""
    return {
        "output_folder": str(output_folder),
        "need_fedot_pretrain": bool(cfg.get("need_fedot_pretrain")),
        "need_evo_opt": bool(cfg.get("need_evo_opt")),
        "search": dict(cfg.get("search") or {}),
        "cluster": dict(cfg.get("cluster") or {}),
        "hooks": tracking_hooks(cfg, model_label(cfg)),
        "resume": bool(cfg.get("resume")),
        "config": dict(cfg),
    }
