"""Building a run: every entry point calls these two functions.

``resolve_setup(spec, overrides)``
    A setup name, a setup file, a FedCore-format dict, a native dict or a ``Setup``, with
    ``{'common': {...}, 'nodes': {<index or kind>: {...}}}`` overrides applied, validated once.
``build_run(setup, ...)``
    Everything else a run needs (model, data module, loss, ``pretrained=`` weights, hooks,
    executor, where the results go) built from objects or from a composed config, then
    ``engine.run``.

Callers: the CLI and the Hydra launchers (:func:`run_from_config`), the Python API
(``pipeline.run_setup``, ``api.fedcore_fit``), the train / fit-target / inference commands
(``entrypoints/``), the Dask fan-out and the ``sweep`` command (``distributed/runs``), and the search.

The imports of what needs torch (engine, checkpoint, progress) and dask (the executor) sit in the
functions that use them, marked: the CLI's setup checks and the Dask launching side import this module
without either.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from .errors import ConfigError, FedcoreError, error_line
from .fedcore_format import native_setup
from .schema import Setup
from .setups import apply_overrides, setup_source
from .tracking import hook_from_config
from .user_code import import_problem, importable_from_working_directory

DEFAULT_SETUP = "RAW"
DEFAULT_OUTPUT = "composition_results"


# -- the setup ---------------------------------------------------------------------------------------------------
def resolve_setup(spec: Any, overrides: Optional[Mapping[str, Any]] = None) -> Setup:
    """A validated Setup from a name (case-insensitive), a path, a mapping (native or FedCore format) or a Setup."""
    if isinstance(spec, Setup) and not overrides:
        return spec
    return Setup.parse(setup_mapping(spec, overrides))


def setup_mapping(spec: Any, overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """The native mapping :func:`resolve_setup` validates (overrides applied). Read alone, it plans a run
    (its folder name, its size) without importing torch and the node modules."""
    if isinstance(spec, Setup):
        spec = spec.to_dict()
    name = None
    if isinstance(spec, (str, Path)):
        spec, name = setup_source(spec)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"a setup is a name, a file path, a mapping or a Setup (got {type(spec).__name__})")
    return apply_overrides(native_setup(dict(spec), name), overrides)


def setup_overrides(cfg: Mapping[str, Any]) -> dict:
    """The setup overrides of a composed config: its ``common`` and ``nodes`` sections."""
    common = dict(cfg.get("common") or {})
    if cfg.get("distributed_compression"):
        common["distributed_compression"] = True
    nodes = cfg.get("nodes") or {}
    if not isinstance(nodes, Mapping):
        raise ConfigError(f"nodes = {nodes!r}: expected overrides by node index or kind (e.g. nodes.0.epochs=5); "
                          f"a new chain goes in a setup file (setup=path/to/setup.yaml)")
    return {"common": common, "nodes": dict(nodes)}


def config_setup(cfg: Mapping[str, Any]) -> Setup:
    """The setup a composed config runs: ``cfg.setup`` (default RAW) with the config's overrides."""
    return resolve_setup(cfg.get("setup") or DEFAULT_SETUP, setup_overrides(cfg))


# -- what the run is built from ----------------------------------------------------------------------------------
def instantiate_target(section: str, spec: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with a one-line error naming the section and its _target_."""
    from hydra.errors import InstantiationException  # hydra's instantiate machinery: only when something is built
    from hydra.utils import instantiate

    if not isinstance(spec, Mapping) or not spec.get("_target_") or spec.get("_target_") == "???":
        raise ConfigError(f"{section}._target_ is required "
                          f"(e.g. {section}=custom {section}._target_=my_pkg.build_{section})")
    importable_from_working_directory()
    try:
        return instantiate(dict(spec), **kwargs)
    except InstantiationException as err:
        reason = import_problem(spec["_target_"]) or error_line(err, typed=False)
        raise ConfigError(f"{section}._target_={spec['_target_']!r} could not be built: {reason}") from None


def load_state_file(model: Any, path: Path, option: str = "pretrained") -> Any:
    """Load a state-dict file (``weights_only``) into ``model``, or into ``model.seq_encoder`` when it fits that."""
    from .checkpoint import load_tensors  # lazy: torch; building is imported without it (Dask launching side)

    try:
        state = load_tensors(path)
    except FedcoreError as err:  # e.g. a pickled module, refused for safety
        raise ConfigError(f"{option}={err}") from None
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


def load_pretrained(model: Any, path: str | Path, option: str = "pretrained") -> Any:
    """``model`` with saved weights: a checkpoint or results folder (its ``final``; structure replayed) or a
    ``.pt``/``.pth`` state-dict file (into ``model``, or its ``seq_encoder`` when the keys fit that)."""
    from .checkpoint import MANIFEST_FILE, load_model  # lazy: torch, as in load_state_file

    p = Path(path)
    if p.is_dir() and ((p / MANIFEST_FILE).exists() or (p / "final" / MANIFEST_FILE).exists()):
        return load_model(p, model)
    if p.is_file():
        return load_state_file(model, p, option)
    raise ConfigError(f"{option}={str(path)!r}: no checkpoint there (expected a checkpoint or results folder, "
                      f"or a .pt/.pth state-dict file)")


def build_model(cfg: Mapping[str, Any], seed: int) -> Any:
    """The model of ``cfg.model``, built under ``seed`` (the run's only seeding before the engine's per-node one),
    started from ``cfg.pretrained`` when given."""
    from .engine import seed_everything  # lazy: torch, as in load_state_file

    seed_everything(seed)
    model = instantiate_target("model", cfg.get("model"))
    if cfg.get("pretrained"):
        model = load_pretrained(model, str(cfg["pretrained"]))
    return model


def build_data(cfg: Mapping[str, Any]) -> Any:
    """The data module of ``cfg.data``."""
    return instantiate_target("data", cfg.get("data"))


@contextlib.contextmanager
def executor_for(cfg: Mapping[str, Any], setup: Setup) -> Iterator[Any]:
    """The executor for per-layer measurements: the cluster when distributed_compression is on."""
    if not setup.common.distributed_compression:
        yield None
        return
    from .distributed import executor_from_config  # lazy: dask, imported only when the cluster is used

    with executor_from_config(dict(cfg.get("cluster") or {})) as executor:
        yield executor


def tracking_hooks(cfg: Mapping[str, Any], model_label: Optional[str]) -> list:
    """The tracking hook of ``cfg.tracking`` (none when ``tracking.name`` is none)."""
    tracking = dict(cfg.get("tracking") or {})
    if tracking.get("name", "none") == "none":
        return []
    hook = hook_from_config(tracking, dict(cfg), model_label)
    return [hook] if hook is not None else []


def placement(folder: str | Path, setup: Setup) -> tuple[Path, Optional[str], Setup]:
    """``(root, model_name, setup)`` that make the engine's results folder exactly ``folder``
    (``{root}/{SETUP}[_{model_name}]``; another folder name renames the setup)."""
    folder = Path(folder)
    if folder.name == setup.name:
        return folder.parent, None, setup
    if folder.name.startswith(f"{setup.name}_"):
        return folder.parent, folder.name[len(setup.name) + 1:], setup
    return folder.parent, None, setup.model_copy(update={"name": folder.name})


# -- the run -----------------------------------------------------------------------------------------------------
def build_run(setup: Setup, *, cfg: Optional[Mapping[str, Any]] = None, model: Any = None, data: Any = None,
              loss: Any = None, output_dir: Optional[str | Path] = None, output_folder: Optional[str | Path] = None,
              model_name: Optional[str] = None, model_label: Optional[str] = None, resume: Optional[bool] = None,
              hooks: Optional[Sequence[Any]] = None, executor: Any = None, cluster: Optional[Mapping] = None,
              config: Optional[dict] = None, teacher: Any = None, training_cache: Any = None,
              first_node: int = 0):
    """Build the run of a resolved ``setup`` and run it; returns the engine's ``RunResult``.

    What is not given comes from ``cfg`` (a composed config: ``model``, ``data``, ``loss``, ``pretrained``,
    ``output_dir``, ``model_name``, ``resume``, ``tracking``, ``cluster``): the model is built under
    ``common.seed`` and started from ``pretrained`` (a given ``model`` is used as it is); hooks are the
    tracking hook and the progress bars; the executor is ``cluster``'s when ``common.distributed_compression``
    is on. Results go to ``{output_dir}/{SETUP}[_{model_name}]``, or exactly to ``output_folder``. The
    results' ``config.yaml`` is ``config`` (default ``cfg``) with ``setup_resolved``. ``teacher``,
    ``training_cache`` and ``first_node``: as in ``engine.run``.
    """
    from .engine import run  # lazy: torch, as in load_state_file

    given = cfg is not None
    cfg = dict(cfg or {})
    if model is None:
        model = build_model(cfg, setup.common.seed)
    if data is None:
        data = build_data(cfg)
    model_name = model_name if model_name is not None else cfg.get("model_name")
    root = Path(output_dir or cfg.get("output_dir") or DEFAULT_OUTPUT)
    if output_folder is not None:
        root, model_name, setup = placement(output_folder, setup)
    if hooks is None:
        from .progress import RunProgress  # lazy: torch, as in load_state_file

        hooks = [*tracking_hooks(cfg, model_label or cfg.get("model_name")), RunProgress()]
    config = cfg if config is None and given else config
    config = {**config, "setup_resolved": setup.to_dict()} if config is not None else None
    resume = bool(cfg.get("resume")) if resume is None else resume
    cluster = {"cluster": cluster if cluster is not None else cfg.get("cluster")}
    with executor_for(cluster, setup) if executor is None else contextlib.nullcontext(executor) as run_executor:
        return run(setup, model, data, loss=loss, conf_loss=cfg.get("loss"), output_dir=root, model_name=model_name,
                   resume=resume, hooks=hooks, executor=run_executor, config=config, teacher=teacher,
                   training_cache=training_cache, first_node=first_node)


load_setup = resolve_setup  # its name in the public API (fedcore_adapter.load_setup)


def run_from_config(cfg: Mapping[str, Any], model_label: Optional[str] = None):
    """Run one composed configuration (the CLI's, a Hydra launcher's or a Dask task's); returns the RunResult."""
    cfg = dict(cfg)
    return build_run(config_setup(cfg), cfg=cfg, model_label=model_label)
