"""What the train / fit-target / inference commands share.

Running a Hydra app on one of the primary configs with one-line errors; the
results folder ``{output_dir}/{SETUP}[_{model_name}]``; building the model
(optionally from pretrained weights) and the data module; the seed's options
as ``fedcore_fit`` keyword arguments.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..errors import ConfigError, FedcoreError

log = logging.getLogger("fedcore_adapter")
STATE_SUFFIXES = (".pt", ".pth")


def run_command(task: Callable[[Any], Any], config_name: str, argv: list[str]) -> None:
    """Run ``task`` as a Hydra app on ``conf/<config_name>.yaml`` with ``argv`` as its command line."""
    import hydra

    from ..cli import exit_if_not_composable, normalize_argv
    from ..resources import conf_dir

    argv = normalize_argv(argv)
    exit_if_not_composable(argv, config_name)
    sys.argv = [sys.argv[0], *argv]
    hydra.main(version_base=None, config_path=str(conf_dir()), config_name=config_name)(task)()


def reporting_errors(cfg: Mapping[str, Any], fn: Callable[[], Any]) -> Any:
    """``fn()``; a FedcoreError (or a missing file / package) becomes one line on stderr and exit code 2."""
    try:
        return fn()
    except (FedcoreError, FileNotFoundError, ImportError) as err:
        if cfg.get("debug"):
            raise
        from ..cli import _one_line

        print(f"error: {_one_line(err)}", file=sys.stderr)
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
    from ..results import run_folder_name

    return Path(cfg.get("output_dir") or "composition_results") / run_folder_name(setup_name, cfg.get("model_name"))


def model_label(cfg: Mapping[str, Any]) -> Optional[str]:
    if cfg.get("model_name"):
        return cfg["model_name"]
    target = str((cfg.get("model") or {}).get("_target_", ""))
    return target.rsplit(".", 1)[-1] or None


def load_state_file(model: Any, path: Path, option: str = "pretrained") -> Any:
    """Load a state-dict file (``weights_only``) into ``model``, or into ``model.seq_encoder`` when it fits that."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - e.g. a pickled module, refused for safety
        reason = " ".join(str(err).split())[:160]
        raise ConfigError(f"{option}={str(path)!r} is not a state-dict file ({type(err).__name__}: {reason}); "
                          f"pickled modules are never loaded: save model.state_dict() or pass a checkpoint folder")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"{option}={str(path)!r} holds a {type(state).__name__}, not a state dict")
    encoder = getattr(model, "seq_encoder", None)
    target = model
    if set(state) != set(model.state_dict()) and encoder is not None and set(state) == set(encoder.state_dict()):
        target = encoder
    missing, unexpected = set(target.state_dict()) - set(state), set(state) - set(target.state_dict())
    if missing or unexpected:
        raise ConfigError(f"{option}={str(path)!r} does not fit the model: {len(missing)} missing and "
                          f"{len(unexpected)} unexpected keys (e.g. {sorted(missing or unexpected)[0]!r})")
    target.load_state_dict(state)
    return model


def load_weights(model: Any, path: str | Path, option: str = "pretrained") -> Any:
    """``model`` with saved weights: a checkpoint or results folder (structure replayed) or a state-dict file."""
    from ..checkpoint import MANIFEST_FILE, load_model

    p = Path(path)
    if p.is_dir() and ((p / MANIFEST_FILE).exists() or (p / "final" / MANIFEST_FILE).exists()):
        return load_model(p, model)
    if p.is_file():
        return load_state_file(model, p, option)
    raise ConfigError(f"{option}={str(path)!r}: no checkpoint there (expected a checkpoint or results folder, "
                      f"or a .pt/.pth state-dict file)")


def build_model(cfg: Mapping[str, Any]) -> Any:
    """The model from ``cfg.model`` (seeded by ``common.seed``), started from ``cfg.pretrained`` when given."""
    from ..engine import seed_everything
    from ..jobs import instantiate_target

    seed_everything(int((cfg.get("common") or {}).get("seed", 42)))
    model = instantiate_target("model", cfg.get("model"))
    if cfg.get("pretrained"):
        model = load_weights(model, str(cfg["pretrained"]))
    return model


def build_data(cfg: Mapping[str, Any]) -> Any:
    from ..jobs import instantiate_target

    return instantiate_target("data", cfg.get("data"))


def fit_options(cfg: Mapping[str, Any], output_folder: Path) -> dict:
    """``fedcore_fit`` keyword arguments from a command's config (the seed's options and the CLI's)."""
    from ..jobs import setup_overrides, tracking_hooks

    return {
        "output_folder": str(output_folder),
        "limit_train_batches": cfg.get("limit_train_batches"),
        "limit_valid_batches": cfg.get("limit_valid_batches"),
        "distributed_compression": bool(cfg.get("distributed_compression")),
        "need_fedot_pretrain": bool(cfg.get("need_fedot_pretrain")),
        "need_evo_opt": bool(cfg.get("need_evo_opt")),
        "cluster": dict(cfg.get("cluster") or {}),
        "overrides": setup_overrides(cfg),
        "hooks": tracking_hooks(cfg, model_label(cfg)),
        "resume": bool(cfg.get("resume")),
        "config": dict(cfg),
    }
