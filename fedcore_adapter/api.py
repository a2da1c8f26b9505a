"""The FedCore adapter's four functions (pytorch-lifestream ``ptls/fedcore_compression/fc_utils.py``).

Code written for the original works unchanged but for the import::

    from fedcore_adapter import fedcore_fit, extract_loss, eval_computational_metrics, get_experimental_setup

    setup, name = get_experimental_setup("composite_1")
    compressor = fedcore_fit(model, dm, setup, loss=extract_loss(model, conf),
                             output_folder=f"composition_results/{name}", limit_train_batches=50)
    compressor.optimised_model, compressor.original_model, compressor.metrics, compressor.output_dir

Where the original was wrong, the numbers here are right: latency is measured
in ms (warm-up on every device), sizes count packed int8 weights, named setups
are looked up case-insensitively and are exactly the ones named.
"""
from __future__ import annotations

import copy
import inspect
import json
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .building import build_run, resolve_setup
from .checkpoint import load_model
from .data import first_batch, limited, model_device, runtime_device
from .data import provides  # noqa: F401 - part of the adapter's surface (entry points use it)
from .deploy import load_artifact
from .errors import ConfigError, DataError, FedcoreError
from .losses import instantiate_loss
from .metrics import measure
from .results import summary_table
from .search.driver import run_search
from .fedcore_format import is_fedcore_format, to_fedcore
from .setups import setup_source

FIT_OPTIONS = ("output_folder", "model_name", "limit_train_batches", "limit_valid_batches", "distributed_compression",
               "need_fedot_pretrain", "need_evo_opt", "search", "cluster", "overrides", "hooks", "executor", "resume",
               "config")
_SEED_TOP_KEYS = ("output_folder", "need_fedot_pretrain", "need_evo_opt", "distributed_compression")
_NO_FEDOT = ("{} is accepted for compatibility and ignored: there is no FEDOT (evolutionary) optimisation here; "
             "the setup's initial_assumption chain runs as given")


# -- get_experimental_setup -------------------------------------------------------------------------------------
def get_experimental_setup(name: Optional[str | Path]) -> tuple[dict, str]:
    """``(setup in the FedCore dict format, name)`` for a named setup (case-insensitive) or a YAML/JSON file.

    ``None`` gives ``({}, 'default')``. A file's name is its stem; its content may be
    in the FedCore or the native format. An unknown name raises a ConfigError listing
    the named setups. The dict is validated, and a fresh copy every call.
    """
    if name is None:
        return {}, "default"
    data, setup_name = setup_source(name)
    native = resolve_setup(data)
    if is_fedcore_format(data):
        return copy.deepcopy(data), setup_name
    fedcore = {"name": setup_name, **to_fedcore(copy.deepcopy(data))}
    try:
        same = resolve_setup(fedcore).model_dump(exclude={"name", "description"}) == \
            native.model_dump(exclude={"name", "description"})
    except ConfigError:  # a kind without a FedCore node name
        warnings.warn(f"setup {setup_name!r} uses node kinds FedCore has no name for; returned in the native "
                      f"format (fedcore_fit accepts it)", stacklevel=2)
        return copy.deepcopy(data), setup_name
    if not same:
        warnings.warn(f"setup {setup_name!r} does not fit the FedCore dict format exactly (one parameter set per "
                      f"node name, FedCore common keys only); pass the name to fedcore_fit to run it as defined",
                      stacklevel=2)
    return fedcore, setup_name


# -- extract_loss -----------------------------------------------------------------------------------------------
class LossFactory:
    """A zero-argument callable giving a loss (the seed's ``lambda: model.loss``), with where it came from."""

    def __init__(self, make: Callable[[], Any], source: str):
        self._make = make
        self.source = source

    def __call__(self) -> Any:
        return self._make()

    def __repr__(self) -> str:
        return f"LossFactory({self.source})"


def extract_loss(model: nn.Module, conf: Optional[Mapping] = None) -> Optional[LossFactory]:
    """A zero-argument callable giving ``model.loss``, else ``model._loss``, else ``conf.loss`` instantiated; or None.

    ``conf.loss`` may be an import path or a ``{_target_: ...}`` mapping (a DictConfig works).
    """
    for attr in ("loss", "_loss"):
        if getattr(model, attr, None) is not None:
            return LossFactory(lambda attr=attr: getattr(model, attr), f"model.{attr}")
    spec = conf.get("loss") if conf is not None and hasattr(conf, "get") else None
    if spec is None:
        return None
    spec = _plain(spec)
    return LossFactory(lambda: instantiate_loss(spec), f"conf.loss={spec!r}")


def _plain(value: Any) -> Any:
    """A DictConfig / ListConfig as plain containers; anything else unchanged."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def resolve_loss(loss: Any) -> Any:
    """The loss itself from what ``fedcore_fit`` was given: a zero-argument factory is called, a class built."""
    if loss is None or isinstance(loss, nn.Module):
        return loss
    if isinstance(loss, type):
        return loss()
    if isinstance(loss, LossFactory):
        return loss()
    if callable(loss):
        try:
            params = inspect.signature(loss).parameters.values()
        except (TypeError, ValueError):
            return loss
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        required = [p for p in params if p.default is p.empty and p.kind in positional]
        return loss() if not required else loss
    return loss


# -- fedcore_fit ------------------------------------------------------------------------------------------------
@dataclass
class FedcoreFitResult:
    """What ``fedcore_fit`` returns (the fitted compressor of the original)."""

    optimised_model: nn.Module
    original_model: nn.Module
    metrics: list[dict]
    output_dir: Path
    setup: Any
    status: str = "completed"
    notes: list[str] = field(default_factory=list)

    @property
    def output_folder(self) -> Path:
        return self.output_dir

    def summary(self) -> str:
        """The metrics table, each value with its ratio to the input model."""
        return summary_table(self.metrics)


class _FitData:
    """The data module as the seed's FedCore saw it: ``train_dataloader()`` and ``val_dataloader()`` only.

    The test split stays held out; metrics rows are measured on the validation split.
    """

    def __init__(self, dm: Any):
        self.dm = dm

    def prepare_data(self) -> None:
        if callable(getattr(self.dm, "prepare_data", None)):
            self.dm.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        if callable(getattr(self.dm, "setup", None)):
            self.dm.setup(stage)

    def train_dataloader(self) -> Any:
        return self.dm.train_dataloader()

    def val_dataloader(self) -> Any:
        return self.dm.val_dataloader() if provides(self.dm, "val_dataloader") else None


def check_datamodule(dm: Any) -> None:
    """One clear line when ``dm`` lacks ``train_dataloader()``."""
    if not provides(dm, "train_dataloader"):
        raise DataError(f"data module {type(dm).__name__} has no train_dataloader(); it must provide "
                        f"train_dataloader(), val_dataloader() and optionally test_dataloader()")


def _seed_setup(experiment_setup: Any, options: dict) -> Any:
    """The setup argument with the seed's top-level options (``output_folder``, ``need_*``,
    ``distributed_compression``) of a FedCore-format dict moved to ``options``."""
    if not (isinstance(experiment_setup, Mapping) and "nodes" not in experiment_setup):
        return experiment_setup
    data = copy.deepcopy(dict(experiment_setup))
    for key in _SEED_TOP_KEYS:
        if key in data:
            options.setdefault(key, data.pop(key))
    if not data:
        raise ConfigError("fedcore_fit: the experiment setup is empty (get_experimental_setup(None) names no "
                          "chain); pass a named setup such as get_experimental_setup('RAW')[0] or a setup file")
    return data


def _fit_overrides(options: dict) -> Optional[dict]:
    """``options['overrides']`` with the seed's batch limits and ``distributed_compression`` in ``common``."""
    overrides = dict(options.get("overrides") or {})
    common = {"limit_train_batches": options.get("limit_train_batches"),
              "limit_valid_batches": options.get("limit_valid_batches"),
              "distributed_compression": True if options.get("distributed_compression") else None}
    common = {k: v for k, v in common.items() if v is not None}
    if common:
        overrides["common"] = {**(overrides.get("common") or {}), **common}
    return overrides or None


def fedcore_fit(model: nn.Module, dm: Any, experiment_setup: Any, loss: Any = None, n_cls: Optional[int] = None,
                **kwargs: Any):
    """Run ``experiment_setup`` on ``model`` with ``dm.train_dataloader()`` / ``dm.val_dataloader()``.

    ``experiment_setup``: a FedCore-format dict (as from :func:`get_experimental_setup`,
    with the seed's ``output_folder`` / ``need_*`` / ``distributed_compression`` keys
    allowed), a native setup dict, a Setup, or a setup name / file path.
    ``loss``: the seed's zero-argument loss factory (:func:`extract_loss`), a loss
    module, class or function; default: ``model.loss``, ``model._loss``, cross-entropy.
    ``n_cls`` is accepted for compatibility (classes come from the model's output).

    Options: ``output_folder`` (the results folder itself; default
    ``composition_results/{SETUP}[_{model_name}]``), ``model_name``,
    ``limit_train_batches`` / ``limit_valid_batches`` (FedCore ``common.batch_limit`` /
    ``calib_batch_limit``), ``distributed_compression`` (with ``cluster``, a cluster
    config mapping), ``need_evo_opt`` (the setup is the initial assumption of a search, ``search`` its
    ``search.*`` options: the result is the search's best trial under its constraint, see
    :func:`fedcore_adapter.search.run_search`), ``need_fedot_pretrain`` (warned about and ignored), and
    the engine's ``overrides``, ``hooks``, ``executor``, ``resume``, ``config``.
    Returns a :class:`FedcoreFitResult`; ``model`` itself is never modified. The metrics
    rows are measured on the validation split: the test split stays held out.
    """
    unknown = sorted(set(kwargs) - set(FIT_OPTIONS))
    if unknown:
        raise ConfigError(f"fedcore_fit: unknown option(s) {unknown}; allowed: {', '.join(FIT_OPTIONS)}")
    if n_cls is not None and (not isinstance(n_cls, int) or isinstance(n_cls, bool) or n_cls < 1):
        raise ConfigError(f"fedcore_fit: n_cls={n_cls!r} must be a positive int or None")
    check_datamodule(dm)
    options = {k: v for k, v in kwargs.items() if v is not None}
    spec = _seed_setup(experiment_setup, options)
    setup = resolve_setup(spec, _fit_overrides(options))
    notes = [_NO_FEDOT.format(f"{key}=True") for key in ("need_fedot_pretrain",) if options.get(key)]
    for note in notes:
        warnings.warn(note, stacklevel=2)
    if options.get("need_evo_opt"):
        return _evolve(model, dm, setup, loss, options, notes)
    result = build_run(setup, model=model, data=_FitData(dm), loss=resolve_loss(loss),
                       output_folder=options.get("output_folder"), model_name=options.get("model_name"),
                       resume=bool(options.get("resume")), hooks=options.get("hooks") or [],
                       executor=options.get("executor"), cluster=options.get("cluster") or {"name": "local"},
                       config=options.get("config"))
    return FedcoreFitResult(result.model, model, result.metrics, result.output_dir, result.setup, result.status, notes)


# -- eval_computational_metrics ---------------------------------------------------------------------------------
def eval_computational_metrics(model: nn.Module, dataloader: Any, save_path: str | Path, id: Any = "",  # noqa: A002
                               n_batches: int = 1, device: Optional[str] = None, *, warmup: int = 3,
                               repeats: int = 20, num_threads: Optional[int] = None) -> dict:
    """Latency (ms per sample), throughput (samples/s) and model size (MB) over the first ``n_batches`` batches.

    Each batch is timed by :func:`fedcore_adapter.metrics.measure` (warm-up, then the
    median of ``repeats`` runs under ``torch.inference_mode()``); latency is total
    time / total samples. Size is the bytes of the saved state dict (packed int8
    weights count as int8) / 2**20. Appends ``#{id} latency: … throughput: … model_size: …``
    to ``save_path``. ``device`` defaults to where the model is (CPU for int8 models).
    ``model`` may also be the path of an exported artifact (``model.onnx``, ``model.xml``, ``model.pt2``,
    or a deploy node's folder): it is measured in its runtime, sized by its files.
    """
    if not isinstance(n_batches, int) or n_batches < 1:
        raise ConfigError(f"eval_computational_metrics: n_batches={n_batches!r} must be a positive int")
    if isinstance(model, (str, Path)):
        model = load_artifact(model, num_threads)
    target = runtime_device(model, torch.device(device) if device else model_device(model))
    model.to(target)
    batches = list(limited(dataloader, n_batches)) or [first_batch(dataloader, "computational metrics loader")]
    rows = [measure(model, [batch], device=target, warmup=warmup, repeats=repeats, num_threads=num_threads)
            for batch in batches]
    total_ms = sum(r["latency_ms"] for r in rows)
    samples = sum(r["batch_size"] for r in rows)
    result = {"latency": total_ms / samples, "throughput": samples * 1e3 / total_ms,
              "model_size": statistics.median(r["size_mb"] for r in rows)}
    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    with open(save_path, "a") as file:
        print(f"#{id}", *(f"{k}: {v:.6g}" for k, v in result.items()), file=file)
    return result


def _evolve(model: nn.Module, dm: Any, setup: Any, loss: Any, options: dict, notes: list[str]):
    """``need_evo_opt=True``: search from the setup's chain (its initial assumption); the best trial under the
    constraint (the first objective's best on the front) is the optimised model."""
    cfg = dict(options.get("config") or {})
    cfg["search"] = {**(cfg.get("search") or {}), **(options.get("search") or {})}
    folder = options.get("output_folder")
    cfg["output_dir"] = str(Path(folder).parent) if folder else cfg.get("output_dir") or "composition_results"
    cfg["cluster"] = options.get("cluster") or {"name": "none"}
    cfg["resume"] = bool(options.get("resume"))
    cfg.setdefault("tracking", {"name": "none"})
    label = options.get("model_name") or cfg.get("model_name") or type(model).__name__
    found = run_search(cfg, model=model, data=_FitData(dm), loss=resolve_loss(loss), model_label=label, setup=setup)
    if found.best is None:
        raise FedcoreError(f"need_evo_opt: {found.message} (results in {found.folder})")
    trial = Path(found.best["output_dir"])
    optimised = load_model(trial / "final", copy.deepcopy(model))
    metrics = json.loads((trial / "metrics.json").read_text())
    best_setup = resolve_setup(found.folder / "pareto" / f"trial_{found.best['trial']:04d}.yaml")
    return FedcoreFitResult(optimised, model, metrics, found.folder, best_setup, "completed", [*notes, found.message])
