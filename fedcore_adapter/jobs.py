"""One job = one composed configuration run end to end (CLI, Hydra launchers and Dask tasks share it).

``run_from_config`` takes a plain, picklable mapping (the composed Hydra
config), builds the setup, model, data module, hooks and executor, and runs
the engine.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from .errors import ConfigError
from .setups import load_setup


def setup_overrides(cfg: Mapping[str, Any]) -> dict:
    common = dict(cfg.get("common") or {})
    if cfg.get("distributed_compression"):
        common["distributed_compression"] = True
    nodes = cfg.get("nodes") or {}
    if not isinstance(nodes, Mapping):
        raise ConfigError(f"nodes = {nodes!r}: expected overrides by node index or kind (e.g. nodes.0.epochs=5); "
                          f"a new chain goes in a setup file (setup=path/to/setup.yaml)")
    return {"common": common, "nodes": dict(nodes)}


def build_setup(cfg: Mapping[str, Any]):
    return load_setup(cfg.get("setup") or "RAW", setup_overrides(cfg))


def instantiate_target(section: str, spec: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with a one-line error naming the section and its _target_."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if not isinstance(spec, Mapping) or not spec.get("_target_") or spec.get("_target_") == "???":
        raise ConfigError(f"{section}._target_ is required (e.g. {section}=custom {section}._target_=my_pkg.build_{section})")
    try:
        return instantiate(dict(spec), **kwargs)
    except InstantiationException as err:
        reason = " ".join(str(err).split()).replace(", set env var HYDRA_FULL_ERROR=1 to see chained exception.", "")
        raise ConfigError(f"{section}._target_={spec['_target_']!r} could not be built: {reason}") from None


@contextlib.contextmanager
def executor_for(cfg: Mapping[str, Any], setup) -> Iterator[Any]:
    """The executor for per-layer measurements: the cluster when distributed_compression is on."""
    if not setup.common.distributed_compression:
        yield None
        return
    from .distributed import executor_from_config

    with executor_from_config(dict(cfg.get("cluster") or {})) as executor:
        yield executor


def tracking_hooks(cfg: Mapping[str, Any], model_label: Optional[str]) -> list:
    tracking = dict(cfg.get("tracking") or {})
    if tracking.get("name", "none") == "none":
        return []
    from .tracking import hook_from_config

    hook = hook_from_config(tracking, dict(cfg), model_label)
    return [hook] if hook is not None else []


def load_pretrained(model, path: str):
    """Start from a saved model: a checkpoint folder, a results folder (its ``final``), or a state-dict file."""
    import torch

    from .checkpoint import MANIFEST_FILE, load_model

    p = Path(path)
    if p.is_dir() and ((p / MANIFEST_FILE).exists() or (p / "final" / MANIFEST_FILE).exists()):
        return load_model(p, model)
    if p.is_file():
        state = torch.load(p, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        return model
    raise ConfigError(f"pretrained={path!r}: no checkpoint there (expected a checkpoint or results folder, "
                      f"or a .pt/.pth state-dict file)")


def run_from_config(cfg: Mapping[str, Any], model_label: Optional[str] = None):
    """Run one composed configuration; returns the engine's RunResult."""
    from .engine import run, seed_everything

    cfg = dict(cfg)
    setup = build_setup(cfg)
    seed_everything(setup.common.seed)
    model = instantiate_target("model", cfg.get("model"))
    if cfg.get("pretrained"):
        model = load_pretrained(model, cfg["pretrained"])
    datamodule = instantiate_target("data", cfg.get("data"))
    label = model_label or cfg.get("model_name")
    with executor_for(cfg, setup) as executor:
        return run(setup, model, datamodule, conf_loss=cfg.get("loss"), output_dir=Path(cfg.get("output_dir") or "composition_results"),
                   model_name=cfg.get("model_name"), resume=bool(cfg.get("resume")),
                   hooks=tracking_hooks(cfg, label), executor=executor, config={**cfg, "setup_resolved": setup.to_dict()})
