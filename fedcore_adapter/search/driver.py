"""The search driver (the seed's ``need_evo_opt``): above the engine, which never knows it runs in a search.

1. the setup (the initial assumption) and ``search.*`` give the space (``space.derive_space``);
2. the shared prefix (the leading training nodes) runs once; its checkpoint starts every trial;
3. Optuna asks for candidates (constrained multi-objective TPE / NSGA-II / random, ask and tell), each a
   setup validated like any other, run as a real run on a worker (``trial.run_trial``) from the longest
   prefix already computed, stopped early when its fine-tune stays below the quality constraint (accuracy, or
   ``search.quality``); after the
   sampler's start-up trials a share of them (``search.reuse``) continues a feasible front trial: its chain
   and its nodes before the last one that changed the model's structure fixed (``search.reuse_redraw``;
   ``study.enqueue_trial`` with those parameters), so the trial starts from that trial's computed prefix and
   the sampler draws the rest; a share of the continuations (``search.reuse_recover``) recovers a trial that
   ended on a structural node, on the front or a near miss: every node kept, a distillation appended; a
   candidate asked again is
   told the earlier trial's figures, not run, and not counted (asked while its twin runs: when the twin ends);
4. the study lives in ``study.journal`` of the results folder: ``resume=true`` continues it, and a trial
   whose worker was lost is asked again with the same parameters; another optimiser may propose the candidates
   instead of the sampler (``run_search(..., loop=)``: ``Search.submit`` with the candidate's parameters, then
   ``Search.collect``), the trials run and are recorded the same way;
5. ``trials.csv``, ``pareto.csv``, ``pareto.png`` (beside the front, the named setups' runs, their final models
   evaluated on the validation split once, by one run: ``reference_points.csv``),
   ``pareto/trial_<n>.yaml`` and the MLflow parent run.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import optuna
from optuna.trial import TrialState

from ..building import config_setup
from ..errors import ConfigError, FedcoreError, error_line
from ..results import write_json
from ..schema import Setup
from ..setups import named_setups
from ..tracking.config import default_experiment
from ..tracking.search_run import SearchRun
from .config import OBJECTIVES, QUALITY_EXCLUDED, SearchConfig, standard_error
from .prefix import PrefixCache, identity_of, prefix_key
from .report import (
    figure_points,
    hypervolume,
    plot_front,
    reference_columns,
    reference_rows,
    setup_yaml,
    split_metrics,
    summary_columns,
    trial_row,
    write_csv,
)
from .space import SearchSpace, chain_label, derive_space
from .trial import open_storage, run_trial

log = logging.getLogger("fedcore_adapter.search")
STATE_FILE = "search.json"
STUDY = "search"
FIDELITY = "fidelity"
_MISSING = object()  # a parameter a trial did not draw
REPEATS_PER_TRIAL = 8  # repeats told per trial wanted before the sampler counts as stuck (continuations of a
#                        front trial re-draw one node on its grid: with search.reuse 0.9 a search told up to 32)


@dataclass
class SearchResult:
    folder: Path
    trials: list[dict]
    front: list[dict]
    best: Optional[dict]
    reference: dict
    message: str
    feasible: bool = True
    study: Any = field(default=None, repr=False)


class SequentialPool:
    """Trials one after another in this process (``cluster=none``), with the Dask pool's interface."""

    slots = 1

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn, self.done = fn, []

    def __len__(self) -> int:
        return len(self.done)

    def submit(self, key: Any, payload: Any) -> None:
        start = time.perf_counter()
        try:
            out = {"status": "completed", "value": self.fn(payload), "error": None}
        except Exception as err:  # noqa: BLE001 - a failing trial is an outcome
            log.debug("trial %s failed", key, exc_info=True)
            out = {"status": "failed", "value": None, "error": error_line(err)}
        self.done.append((key, {**out, "worker": "local", "wall_s": time.perf_counter() - start}))

    def finished(self, timeout: Optional[float] = None) -> list:
        out, self.done = self.done, []
        return out

    def close(self) -> None:
        self.done = []


def _startup_trials(scfg: SearchConfig) -> int:
    """The sampler's start-up trials (TPE's random ones; no continuation before they are asked)."""
    return max(4, min(10, scfg.trials // 3))


def _sampler(scfg: SearchConfig) -> Any:
    """The optimiser; constraints come with each trial (``Trial.set_constraint``), which both samplers honour."""
    if scfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=scfg.seed)
    if scfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=scfg.seed, population_size=max(4, min(20, scfg.trials // 3)))
    with warnings.catch_warnings():  # group (conditional spaces: the chains' own fields) is "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=scfg.seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=_startup_trials(scfg))


def _open_folder(folder: Path, resume: bool, signature: str) -> dict:
    state_path = folder / STATE_FILE
    if folder.exists() and any(folder.iterdir()):
        if not resume:
            raise ConfigError(f"{folder} holds a search already; pass resume=true to continue it, or another "
                              f"model_name / output_dir for a new one")
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        if state.get("space") != signature:
            raise ConfigError(f"cannot resume {folder}: the search space differs from the interrupted search's "
                              f"(setup, overrides or search.* changed); use another model_name / output_dir")
        return state
    if resume:
        log.warning("resume=true: nothing to resume under %s (no search there); starting a new search", folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {"space": signature}


class _Progress:
    """One line per finished trial: n/N, its metrics, the best trial under the constraint, the ETA."""

    def __init__(self, total: int, done: int, objectives: list[str], quality: str = "accuracy"):
        self.total, self.done, self.objectives, self.quality = total, done, objectives, quality
        self.start, self.counted = time.time(), 0

    def line(self, row: dict, best: Optional[dict]) -> str:
        self.done += 1
        self.counted += 1
        elapsed = time.time() - self.start
        left = max(0, self.total - self.done)
        eta = elapsed / self.counted * left
        what = _describe(row, self.objectives, self.quality) if row["state"] in ("complete", "pruned") \
            else f"FAILED: {row['error']}"
        if row["state"] == "pruned":
            what = f"stopped early ({row.get('error')})"
        flag = {True: " [meets constraint]", False: " [misses constraint]"}.get(row.get("feasible"), "")
        best_text = f"#{best['trial']} {_describe(best, self.objectives, self.quality)}" if best else "none yet"
        return (f"trial {self.done}/{self.total} #{row['trial']} {row['chain']}: {what}{flag} | best under the "
                f"constraint: {best_text} | ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def _number(value: float) -> str:
    """Four significant digits below 1000 (a 12.34 ms latency is not 12), thousands separated above."""
    if isinstance(value, float) and abs(value) < 1000:
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"
    return f"{value:,.0f}"


def _describe(row: dict, objectives: list[str], quality: str = "accuracy") -> str:
    """The row's objectives, then its validation quality (accuracy), and accuracy and loss where an objective (what
    the search selects on), and their test figures (held out)."""
    parts = []
    per_split = split_metrics(quality)
    split = [quality, *[o for o in objectives if o in per_split and o != quality]]
    for name in dict.fromkeys([*[o for o in objectives if o not in per_split],
                               *(f"{pre}{o}" for o in split for pre in ("val_", ""))]):
        value = row.get(name)
        if not isinstance(value, (int, float)):
            continue
        label = f"val {name[4:]}" if name.startswith("val_") else f"test {name}" if name in per_split else name
        text = f"{label} {_number(value)}"
        reduction = row.get("macs_reduction") if name == "macs" else None
        if reduction:
            text += f" ({reduction:.1f}x fewer)" if reduction >= 1 else f" ({1 / reduction:.2f}x more)"
        if row.get(f"{name}_drop_pt") is not None:
            text += f" ({-row[f'{name}_drop_pt']:+.1f} pt)"
        parts.append(text)
    return ", ".join(parts)


def kept_structure(rows: list[dict]) -> list[bool]:
    """Per node of a run's measured ``rows`` (the input's row first): whether it left the model's structure as it
    found it: the same parameters and MACs, and bytes on disk within 0.1 % (a distillation or a fine-tune)."""
    def same(a: dict, b: dict) -> bool:
        counts = [(a.get(k), b.get(k)) for k in ("params", "macs")]
        size = (a.get("size_mb"), b.get("size_mb"))
        return all(isinstance(x, (int, float)) and x == y for x, y in counts) \
            and all(isinstance(x, (int, float)) for x in size) and math.isclose(*size, rel_tol=1e-3)

    return [same(a, b) for a, b in zip(rows, rows[1:])]


def _rerun_attrs(trial: Any) -> dict:
    """What a lost trial asked again keeps of its own: the templates a recovery appended, whom it continued."""
    keep = ("append", "continues", "recovers")
    return {"rerun_of": trial.number, **{k: trial.user_attrs[k] for k in keep if k in trial.user_attrs}}


def _dominates(a: list[float], b: list[float]) -> bool:
    """Whether ``a`` dominates ``b`` (values to be minimised): no worse in any, better in one."""
    return all(x <= y for x, y in zip(a, b)) and a != b


def _val_figures(value: Mapping[str, Any], prefix: str = "") -> dict:
    """A run's validation figures (``val_accuracy``, ``val_loss``, ``val_<quality>``...; of its input model with
    ``prefix="input_"``), named ``val_<metric>``."""
    skip = (f"{prefix}val_split", f"{prefix}val_samples")
    return {k[len(prefix):]: v for k, v in value.items() if k.startswith(f"{prefix}val_") and k not in skip}


def _key(nodes: Any) -> str:
    """A candidate's identity: its nodes, as JSON."""
    return json.dumps(nodes, sort_keys=True, default=str)


class Search:
    """One search: its config, space, folder, study, pool and prefix cache."""

    def __init__(self, cfg: Mapping[str, Any], *, model: Any = None, data: Any = None, loss: Any = None,
                 model_label: Optional[str] = None, setup: Optional[Setup] = None):
        self.cfg = copy.deepcopy(dict(cfg))
        self.scfg = SearchConfig.parse(self.cfg.get("search"))
        self.setup = setup if setup is not None else config_setup(self.cfg)
        self.space: SearchSpace = derive_space(self.setup, self.scfg)
        if self.space.is_empty():
            chain = " -> ".join(n.kind for n in self.setup.nodes)
            raise ConfigError(f"search space is empty: setup {self.setup.name} ({chain}) has no searchable field and "
                              f"no chain move after its shared prefix; widen it with search.space.<kind>.<field>="
                              f"{{low: ..., high: ...}} or search.moves.insert=[pruning, ...]")
        if self.scfg.max_accuracy_drop is not None and self.quality not in self.scfg.objectives:
            log.info("constraint on %s (not an objective): it is still measured and checked", self.quality)
        self.objects = {"model": model, "data": data, "loss": loss}
        label = model_label or self.cfg.get("model_name") or "model"
        self.label = label
        self.folder = Path(self.cfg.get("output_dir") or "composition_results") / f"SEARCH_{self.setup.name}_{label}"
        self.identity = identity_of(self.cfg, model)
        self.base_seed = self.setup.common.seed

    # -- payloads ------------------------------------------------------------------------------------------
    def _payload(self, name: str, nodes: list[dict], start: int, checkpoint: Optional[Path], out: Path,
                 tracking_name: str, **extra: Any) -> dict:
        common = {**self.space.common, "seed": self.base_seed}
        cfg = {k: v for k, v in self.cfg.items() if k not in ("search",)}
        cfg["pretrained"] = None if checkpoint is not None else self.cfg.get("pretrained")
        cfg["resume"] = False
        if self.tracker is not None:
            cfg["tracking"] = self.tracker.trial_tracking(tracking_name)
        payload = {"setup": {"name": name, "common": common, "nodes": copy.deepcopy(nodes[start:])}, "cfg": cfg,
                   "start": str(checkpoint) if checkpoint is not None else None, "first_node": start,
                   "output_dir": str(out), **extra}
        return {**payload, **{k: v for k, v in self.objects.items() if v is not None}}

    # -- the run -------------------------------------------------------------------------------------------
    def run(self, pool_factory: Callable[[], Any], loop: Optional[Callable[["Search", Any], None]] = None
            ) -> SearchResult:
        """The search; ``loop(search, pool)``, when given, replaces the sampler's ask-and-tell loop: it proposes
        the candidates (``submit`` with their parameters) and collects them (``collect``) until ``remaining`` is 0."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        resume = bool(self.cfg.get("resume"))
        self.state = _open_folder(self.folder, resume, self.space.signature())
        storage = open_storage(self.folder / "study.journal")
        constrained = self.scfg.max_accuracy_drop is not None
        self.study = optuna.create_study(study_name=STUDY, storage=storage, directions=self.scfg.directions(),
                                         sampler=_sampler(self.scfg), load_if_exists=True)
        self.fidelity = optuna.create_study(study_name=FIDELITY, storage=storage, direction="maximize",
                                            load_if_exists=True)
        judged_on = (self.state.get("search") or {}).get("quality", "accuracy")
        if judged_on != self.quality and self.study.trials:
            raise ConfigError(f"cannot resume {self.folder}: its trials were judged on search.quality={judged_on}, "
                              f"not {self.quality}; resume with search.quality={judged_on}, or use another "
                              f"model_name / output_dir")
        self.state.setdefault("started_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.state["search"] = self.scfg.model_dump(mode="json")
        self.state["space_description"] = self.space.describe()
        self._save()
        self.cache = PrefixCache(self.folder)
        self.measuring: Any = None  # the run asked to measure the reference runs, until it ends
        self.reference_folders = [str(Path(p).absolute()) for p in self.scfg.reference_runs] or \
            [str(p.absolute()) for p in self._named_runs()]
        self._recover_lost()
        self.tracker = self._tracker()
        log.info("search %s: %d trials, objectives %s%s\n%s", self.folder, self.scfg.trials, self.scfg.objectives,
                 f", validation {self.quality} drop <= {self.scfg.max_accuracy_drop * 100:g} pt" if constrained
                 else "",
                 self.space.describe())
        pool = pool_factory()
        status = "failed"
        self.in_flight: dict[int, tuple] = {}  # trial number -> (trial, fidelity trial, candidate key)
        self.twins: dict[int, list] = {}  # trial in flight -> the same candidates asked meanwhile, told when it ends
        self.retries: dict[str, int] = {}
        try:
            self._prefix(pool)
            self.progress = _Progress(self.scfg.trials, self._finished(), self.scfg.objectives, self.quality)
            (loop or Search._loop)(self, pool)
            status = "completed"
        finally:
            pool.close()
            result = self._report()
            self.state["status"] = status
            self._save()
            if self.tracker is not None:
                self.tracker.finish(self._summary_metrics(result), [self.folder / f for f in
                                    ("trials.csv", "pareto.csv", "pareto.png", "reference_points.csv", "pareto",
                                     STATE_FILE)], status)
        return result

    def _save(self) -> None:
        write_json(self.folder / STATE_FILE, self.state)

    def _tracker(self) -> Any:
        tracking = dict(self.cfg.get("tracking") or {})
        if tracking.get("name", "none") == "none":
            return None
        experiment = tracking.get("experiment") or default_experiment(self.cfg, self.cfg.get("model_name"))
        tracker = SearchRun(tracking, experiment, self.folder.name)
        self.state["mlflow_run_id"] = tracker.start({"setup": self.setup.name, "search": self.state["search"]},
                                                    self.state.get("mlflow_run_id"))
        self._save()
        return tracker

    def _recover_lost(self) -> None:
        """Trials left running by an interrupted search are failed as lost and asked again (same parameters)."""
        for study in (self.study, self.fidelity):
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                if study is self.study and t.state == TrialState.RUNNING:
                    optuna.trial.Trial(study, t._trial_id).set_user_attr("lost", True)
                    study.enqueue_trial(t.params, user_attrs=_rerun_attrs(t), skip_if_exists=False)
                    log.info("trial #%d was interrupted: asked again with the same parameters", t.number)
                if t.state == TrialState.RUNNING:
                    study.tell(t.number, state=TrialState.FAIL)

    def _finished(self) -> int:
        """Trials finished and counted: complete, stopped, failed (not lost, not a repeat told from an earlier one)."""
        return sum(1 for t in self.study.get_trials(deepcopy=False)
                   if (t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                       or (t.state == TrialState.FAIL and not t.user_attrs.get("lost")))
                   and t.user_attrs.get("same_as") is None)

    @property
    def quality(self) -> str:
        """The metric the constraint is on (``search.quality``: accuracy by default)."""
        return self.scfg.quality

    @property
    def reference(self) -> dict:
        return self.state.get("reference") or {}

    @property
    def on_validation(self) -> bool:
        """Trials are selected on the validation split (unless the data module has none: then on test)."""
        return self.state.get("selection", "validation") == "validation"

    def _note_split(self, value: Mapping[str, Any]) -> None:
        """The first finished run tells whether the data module has a validation loader (search.json: selection)."""
        if "selection" in self.state or "val_split" not in value:
            return
        self.state["selection"] = "validation" if value["val_split"] else "test"
        self.state["val_samples"] = value.get("val_samples")
        if not value["val_split"]:
            self.state["selection_note"] = "the data module has no val_dataloader(): selected on the test split"
            log.warning("the data module has no val_dataloader(): the search selects trials on the test split "
                        "(no held-out figure)")
        self._save()

    def _selected(self, value: Mapping[str, Any], row: Mapping[str, Any], name: str) -> Any:
        """``accuracy`` / ``loss`` / the quality as the search selects on it: the validation figure, or the row's
        (test) one."""
        if name in split_metrics(self.quality) and self.on_validation:
            return value.get(f"val_{name}")
        return row.get(name)

    def _references_to_measure(self, key: Any) -> dict:
        """``{"references": [...]}``, the payload's part asking run ``key`` to evaluate the reference runs (named
        setups) that no run has measured yet on the validation split, or ``{}``: one run at a time measures them
        (the others in flight do not repeat it); a run that ends without measuring them hands it to the next."""
        if self.state.get("selection") == "test" or self.measuring is not None:
            return {}
        done = self.state.get("reference_points") or {}
        refs = [f for f in self.reference_folders if f not in done and (Path(f) / "metrics.json").exists()]
        if refs:
            self.measuring = key
        return {"references": refs} if refs else {}

    def _note_references(self, key: Any, name: str, value: Mapping[str, Any] | None) -> None:
        """Keep what run ``key`` (results folder ``name``) measured of the reference runs (search.json:
        ``reference_points``, each with ``measured_by``)."""
        if key != self.measuring:
            return
        self.measuring = None
        got = (value or {}).get("references") or {}
        if got:
            self.state["reference_points"] = {**(self.state.get("reference_points") or {}),
                                              **{f: {**v, "measured_by": name} for f, v in got.items()}}
            self._save()

    def _reference_quality(self) -> Optional[float]:
        ref = self.reference
        q = ref.get(f"val_{self.quality}") if self.on_validation else (ref.get("row") or {}).get(self.quality)
        return q if isinstance(q, (int, float)) else None

    def _line(self) -> Optional[float]:
        acc = self._reference_quality()
        if self.scfg.max_accuracy_drop is None or acc is None:
            return None
        return acc - self.scfg.max_accuracy_drop

    def _prefix(self, pool: Any) -> None:
        """Run the shared prefix once (or find it computed); its last row is the reference."""
        n = len(self.space.prefix)
        if not n:
            return
        key = prefix_key(self.identity, {**self.space.common, "seed": self.base_seed}, self.space.prefix)
        if self.cache.get(key) is not None and self.reference:
            self._check_quality()
            return
        log.info("computing the shared prefix (%s) once", " -> ".join(x["kind"] for x in self.space.prefix))
        name = f"PREFIX_{key[:8]}"
        payload = self._payload(name, self.space.prefix, 0, None, self.folder / "prefix", "prefix",
                                **self._references_to_measure("prefix"))
        for attempt in range(self.scfg.retries + 1):
            pool.submit("prefix", payload)
            outcome = None
            while outcome is None:
                done = pool.finished(timeout=30)  # the prefix is the pool's only job
                outcome = done[-1][1] if done else None
            if not outcome.get("lost") or attempt == self.scfg.retries:
                break
            log.warning("the shared prefix lost its worker (%s): run again", outcome.get("error"))
        if outcome["status"] != "completed":
            self._note_references("prefix", name, None)
            raise FedcoreError(f"the shared prefix failed: {outcome['error']}")
        value = outcome["value"]
        self._note_split(value)
        self._note_references("prefix", name, value)
        self.cache.put(key, Path(value["output_dir"]) / "final")
        self._set_reference({"row": value["metrics"][-1], **_val_figures(value), "output_dir": value["output_dir"],
                             "wall_s": outcome.get("wall_s")})

    def _set_reference(self, reference: dict) -> None:
        """Keep ``reference`` (the uncompressed model's figures, which the constraint line is drawn from), warn when
        its validation split is too small for the constraint, and save the search's state. A constraint on a
        quality the model does not report is a ConfigError naming the ones it does."""
        self.state["reference"] = reference
        self._check_validation_size()
        self._save()
        self._check_quality()

    def _check_quality(self) -> None:
        """A constraint on a quality the reference model does not report: a ConfigError naming the ones it does."""
        if self.scfg.max_accuracy_drop is not None and self._reference_quality() is None:
            row = self.reference.get("row") or {}
            reported = [k for k in row if isinstance(row[k], (int, float)) and not isinstance(row[k], bool)
                        and k not in OBJECTIVES and k not in QUALITY_EXCLUDED]
            split = "validation" if self.on_validation else "test"
            fix = (f"it reports {', '.join(reported)}: set search.quality to one of them" if reported else
                   "it reports no quality column (batches without labels?): give the data labels, or the model a "
                   "validation_step that logs a metric")
            raise ConfigError(
                f"search.quality = {self.quality!r}: the model reports no {self.quality} on the {split} split, so "
                f"the constraint (search.max_accuracy_drop) cannot be checked; {fix}, or set "
                f"search.max_accuracy_drop=null to search without a constraint")

    def _check_validation_size(self) -> None:
        """Warn once when the validation split is too small for the constraint: the standard error of the
        reference's validation accuracy is half of ``max_accuracy_drop`` or more (search.json: ``val_note``)."""
        n, p, drop = self.state.get("val_samples"), self.reference.get(f"val_{self.quality}"), \
            self.scfg.max_accuracy_drop
        if "val_standard_error" in self.state or not self.on_validation or not n or not drop \
                or not isinstance(p, (int, float)):
            return
        se = standard_error(p, n)
        self.state["val_standard_error"] = se
        if se >= drop / 2:
            wanted = math.ceil(4 * p * (1 - p) / drop ** 2)
            self.state["val_note"] = (
                f"the validation split has {n} samples: the reference's {self.quality} there, {p:.3f}, has a "
                f"standard error of "
                f"{100 * se:.1f} pt, {se / drop:.0%} of the constraint ({100 * drop:g} pt), so trials near the line "
                f"are told apart by chance and the best one may hold less on the test split; a val_dataloader() of "
                f"{wanted:,}+ samples brings it under half the constraint")
            log.warning(self.state["val_note"])

    def _margin(self) -> float:
        """How far below the constraint line a node may end before its trial is stopped (``early_stop.margin``;
        auto: from the reference's validation accuracy and the split's size), kept in search.json."""
        margin = self.scfg.early_stop_margin(self.reference.get(f"val_{self.quality}"), self.state.get("val_samples"))
        self.state["early_stop_margin"] = margin
        return margin

    def _early_stop_spec(self, trial_id: int) -> Optional[dict]:
        es = self.scfg.early_stop
        val = self.reference.get(f"val_{self.quality}")
        if not es.enabled or self.scfg.max_accuracy_drop is None or not isinstance(val, (int, float)):
            return None
        return {"storage": str((self.folder / "study.journal").absolute()), "study": FIDELITY, "trial_id": trial_id,
                "quality": self.quality,
                "lower": val - self.scfg.max_accuracy_drop - self._margin(), "patience": es.patience,
                "within_nodes": es.within_nodes, "min_curves": es.min_curves,
                "recovered_by": list(es.recovered_by)}

    def _start_of(self, nodes: list[dict]) -> tuple[int, Optional[Path]]:
        """Where a trial starts: the longest computed prefix of its chain (at least the shared one)."""
        n = len(self.space.prefix)
        common = {**self.space.common, "seed": self.base_seed}
        shared = self.cache.get(prefix_key(self.identity, common, nodes[:n])) if n else None
        if not self.scfg.share_prefix:
            return (n, shared) if shared is not None else (0, None)
        j, found = self.cache.longest(self.identity, common, nodes, n)
        return (j, found) if found is not None else ((n, shared) if shared is not None else (0, None))

    @property
    def remaining(self) -> int:
        """Trials still to start: ``search.trials`` less those finished (complete, stopped, failed) and in flight."""
        return max(0, self.scfg.trials - self._finished() - len(self.in_flight))

    def submit(self, pool: Any, params: Optional[Mapping[str, Any]] = None,
               user_attrs: Optional[Mapping[str, Any]] = None) -> int:
        """Ask the study for a trial and start it on ``pool``; its number. ``params`` (``chain`` and
        ``<node id>.<field path>``, as :meth:`SearchSpace.suggest` names them) fix the candidate instead of the
        sampler (``study.enqueue_trial``; those not given are drawn by the sampler). A candidate that is not a
        valid setup is failed at once, not started (``number in search.in_flight`` tells)."""
        if params is not None:
            self.study.enqueue_trial(dict(params), user_attrs=dict(user_attrs or {}) or None, skip_if_exists=False)
        return self._ask(pool)

    def continuation(self) -> Optional[tuple[dict, dict]]:
        """``(params, user_attrs)`` of the next trial when it continues a feasible front trial (``search.reuse``
        of the trials after the sampler's start-up ones, or after ``search.reuse_after``): that trial's chain and
        the fields of every node but its last (``search.reuse_redraw``: or from its last that changed the model's
        structure), so it starts from that trial's computed prefix; None: the sampler draws the whole trial. Front
        trials whose chain is one node or whose re-drawn nodes have nothing to draw are not continued, nor one
        whose prefix ``search.reuse_per_prefix`` continuations started from already; the one continued is drawn
        as ``search.reuse_parent`` says. A share of them (``search.reuse_recover``) recovers a trial instead
        (:meth:`_recoverable`) while one may be. Seeded by ``search.seed`` and the trial's number."""
        asked = len(self.study.trials)
        after = self.scfg.reuse_after or _startup_trials(self.scfg)
        if not self.scfg.reuse or asked < after or not self.scfg.share_prefix:
            return None
        rng = random.Random(f"{self.scfg.seed}:{asked}")
        if rng.random() >= self.scfg.reuse:
            return None
        if self.scfg.reuse_recover and rng.random() < self.scfg.reuse_recover:
            recoverable = self._recoverable()
            if recoverable:
                parent, params, append = recoverable[rng.randrange(len(recoverable))]
                return params, {"continues": parent.number, "recovers": parent.number,
                                **({"append": append} if append else {})}
        parents = []
        for row in self._front():
            trial = self.study.trials[row["trial"]]
            chain = self._ids(trial)
            cut = self._redrawn_from(trial, chain)
            if len(chain) < 2 or cut < 1 or not any(self.space.templates[n].dims for n in chain[cut:]):
                continue
            kept = set(chain[:cut])
            params = {k: v for k, v in trial.params.items() if k == "chain" or k.split(".", 1)[0] in kept}
            append = list(trial.user_attrs.get("append") or [])
            if self.scfg.reuse_per_prefix is None or self._continued(params, append) < self.scfg.reuse_per_prefix:
                parents.append((trial, params, append))
        if not parents:
            return None
        if self.scfg.reuse_parent == "contribution":
            weights = self._contributions([t for t, _, _ in parents])
            parent, params, append = rng.choices(parents, weights)[0] if sum(weights) > 0 else rng.choice(parents)
        else:
            parent, params, append = parents[rng.randrange(len(parents))]
        return params, {"continues": parent.number, **({"append": append} if append else {})}

    def _ids(self, trial: Any) -> tuple[str, ...]:
        """The template ids of ``trial``'s chain: the chain drawn, then the templates a recovery appended."""
        label = trial.params.get("chain", self.space.initial)
        return self.space.chains[label] + tuple(trial.user_attrs.get("append") or ())

    def _recoverable(self) -> list[tuple[Any, dict, list[str]]]:
        """The recovery continuations that may be asked, ``(parent, its params, [the template appended])``: every
        node of a complete trial kept and a recovery node (``early_stop.recovered_by``, inserted as
        ``search.moves.insert`` allows) appended after its last one, where that last node changed the model's
        structure (measured) and the trial is on the feasible front or at most ``search.recover_within`` below
        the constraint line; each trial recovered once, those not dominated among them offered."""
        line = self._line()
        templates = self.space.recovery_templates(self.scfg.early_stop.recovered_by)
        if line is None or not templates:
            return []
        recovered = {t.user_attrs.get("recovers") for t in self.study.get_trials(deepcopy=False)}
        front = {r["trial"] for r in self._front()}
        out = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            kept = t.user_attrs.get("kept_structure") or [True]
            acc = self._selected(t.user_attrs, t.user_attrs.get("metrics") or {}, self.quality)
            if t.user_attrs.get("same_as") is not None or t.number in recovered or kept[-1] \
                    or not isinstance(acc, (int, float)):
                continue
            if not (t.number in front or (not t.user_attrs.get("feasible") and acc >= line - self.scfg.recover_within)):
                continue
            chain = self._ids(t)
            tid = next((x for x in templates if x not in chain and self.space.allows(chain + (x,))), None)
            if tid is None:
                continue
            label, append = chain_label(chain + (tid,)), list(t.user_attrs.get("append") or [])
            if label in self.space.chains and not append:  # a chain of the space: drawn as that chain
                out.append((t, {**t.params, "chain": label}, []))
            else:  # beyond the space's moves: the chain drawn, then the template appended
                out.append((t, dict(t.params), [*append, tid]))
        points = [self._signed(t.values) for t, _, _ in out]
        return [c for c, p in zip(out, points) if not any(_dominates(q, p) for q in points)]

    def _signed(self, values: list[float]) -> list[float]:
        """A trial's objective values, each to be minimised."""
        return [v if d == "minimize" else -v for v, d in zip(values, self.scfg.directions())]

    def _redrawn_from(self, trial: Any, chain: list[str]) -> int:
        """The index in ``chain`` (``trial``'s) of the first node its continuations re-draw: the last node, or
        (``search.reuse_redraw: structural``) the last one measured to change the model's structure, past those
        this trial ran and measured leaving it as it was (a node it started past counts as changing it); a
        continuation keeps the chain's first node at least."""
        cut = len(chain) - 1
        if self.scfg.reuse_redraw != "structural":
            return cut
        kept = trial.user_attrs.get("kept_structure") or []
        first = (trial.user_attrs.get("start_node") or 0) - len(self.space.prefix)  # its first node run, in chain
        while cut > 1 and 0 <= cut - first < len(kept) and kept[cut - first]:
            cut -= 1
        return cut

    def _continued(self, kept: Mapping[str, Any], append: list[str]) -> int:
        """Continuations asked so far from the prefix ``kept`` (the chain, the templates appended to it and the
        fields of the nodes kept)."""
        return sum(1 for t in self.study.trials if "continues" in t.user_attrs
                   and list(t.user_attrs.get("append") or []) == append
                   and all(t.params.get(k, _MISSING) == v for k, v in kept.items()))

    def _contributions(self, trials: list[Any]) -> list[float]:
        """Each trial's exclusive share of the hypervolume of ``trials`` (their objective values as selected):
        what the front loses without it. The reference point: the uncompressed model's value of each cost
        objective and the constraint line for accuracy, or the worst value among the trials (then the trials at
        that end add nothing of their own in that objective)."""
        directions = self.scfg.directions()
        points = [list(t.values) for t in trials]
        ref_row = self.reference.get("row") or {}
        reference = []
        for i, (name, direction) in enumerate(zip(self.scfg.objectives, directions)):
            value = self._line() if name == self.quality else ref_row.get(name) if name != "loss" else None
            worst = (max if direction == "minimize" else min)(p[i] for p in points)
            if not isinstance(value, (int, float)) or math.isnan(value):
                value = worst
            reference.append(max(value, worst) if direction == "minimize" else min(value, worst))
        whole = hypervolume(points, directions, reference)
        return [max(0.0, whole - hypervolume(points[:i] + points[i + 1:], directions, reference))
                for i in range(len(points))]

    def collect(self, pool: Any, timeout: Optional[float] = None) -> list[tuple[int, Optional[dict]]]:
        """Tell the study the trials that finished (waiting up to ``timeout`` s for one), a progress line each;
        ``[(number, row)]``, row as in ``trials.csv``, ``None`` for a trial lost with its worker and asked again."""
        out = []
        for number, outcome in pool.finished(timeout=timeout):
            trial, fid, _ = self.in_flight.pop(number)
            row = self._tell(trial, fid, outcome)
            if row is not None:
                print(self.progress.line(row, self._best()), flush=True)
            out.append((number, row))
            for twin, label in self.twins.pop(number, []):  # lost: asked again, so the twin is not told a figure
                self._tell_repeat(twin, label, self.study.trials[number], lost=row is None)
                out.append((twin.number, self.row(twin.number)))
        return out

    def row(self, number: int) -> dict:
        """Trial ``number``'s row (as in ``trials.csv``)."""
        return self._row(self.study.trials[number])

    def _ask(self, pool: Any) -> int:
        trial = self.study.ask()
        try:
            label, nodes = self.space.suggest(trial, tuple(trial.user_attrs.get("append") or ()))
            shared = self.cache.get(prefix_key(self.identity, {**self.space.common, "seed": self.base_seed},
                                               self.space.prefix)) if self.space.prefix else None
            for node in nodes[len(self.space.prefix):]:
                if node["kind"] == "distillation" and shared is not None and not node.get("teacher_checkpoint"):
                    node["teacher_checkpoint"] = str(shared.absolute())  # the trained model, in trial and re-run
            Setup.parse({"name": self.setup.name, "common": self.space.common, "nodes": copy.deepcopy(nodes)})
        except ConfigError as err:
            trial.set_user_attr("error", str(err))
            self.study.tell(trial, state=TrialState.FAIL)
            log.info("trial #%d: candidate rejected: %s", trial.number, err)
            return trial.number
        key = _key(nodes)
        earlier = self._evaluated(key)
        if earlier is not None:
            self._tell_repeat(trial, label, earlier)
            return trial.number
        twin = next((n for n, (_, _, running) in self.in_flight.items() if running == key), None)
        if twin is not None:  # told the twin's figures when it finishes (collect), not run twice at once
            self.twins.setdefault(twin, []).append((trial, label))
            log.info("trial #%d: the same candidate as trial #%d, still running; told its figures when it ends",
                     trial.number, twin)
            return trial.number
        start, checkpoint = self._start_of(nodes)
        trial.set_user_attr("chain", label)
        trial.set_user_attr("nodes", nodes)
        trial.set_user_attr("start_node", start)
        fid = None
        extra: dict[str, Any] = {}
        spec = None
        if start < len(nodes):
            fid = self.fidelity.ask()
            fid.set_user_attr("trial", trial.number)  # its numbers part from the search's with repeats told
            spec = self._early_stop_spec(fid._trial_id)
        if spec:
            extra["early_stop"] = spec
        if self.scfg.share_training:
            extra["training_cache"] = {"folder": str((self.folder / "prefix" / "training").absolute()),
                                       "max_bytes": int(self.scfg.training_cache_mb * 2**20)}
        if start == 0 and not isinstance(self.reference.get(f"val_{self.quality}"), (int, float)):
            extra["input_val"] = True  # no prefix ran: the input model's validation figures are the reference
        name = f"trial_{trial.number:04d}"
        extra.update(self._references_to_measure(trial.number))
        payload = self._payload(name, nodes, start, checkpoint, self.folder / "trials", name, **extra)
        pool.submit(trial.number, payload)
        self.in_flight[trial.number] = (trial, fid, key)
        return trial.number

    def _evaluated(self, key: str) -> Optional[Any]:
        """The finished trial (complete or stopped) that ran the candidate ``key`` (its nodes): the runs are
        deterministic, so the same candidate would give the same figures. None when there is none, or when the
        sampler has repeated itself ``REPEATS_PER_TRIAL`` times per trial wanted (it is stuck: what it asks then
        runs and counts)."""
        trials = self.study.get_trials(deepcopy=False)
        if sum(t.user_attrs.get("same_as") is not None for t in trials) >= REPEATS_PER_TRIAL * self.scfg.trials:
            return None
        return next((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                     and t.user_attrs.get("same_as") is None and _key(t.user_attrs.get("nodes")) == key), None)

    def _tell_repeat(self, trial: Any, label: str, earlier: Any, lost: bool = False) -> None:
        """Tell a candidate asked again with the earlier trial's figures, without running it; it is not counted
        among ``search.trials`` (the sampler learns it, the search asks another), and is not on the front.
        ``lost``: the earlier trial (its twin in flight) lost its worker and is asked again: failed, no figures."""
        if lost:
            trial.set_user_attr("chain", label)
            trial.set_user_attr("same_as", earlier.number)
            self.study.tell(trial, state=TrialState.FAIL)
            return
        for key, value in earlier.user_attrs.items():
            if key not in ("continues", "rerun_of", "wall_s", "worker"):
                trial.set_user_attr(key, value)
        trial.set_user_attr("chain", label)
        trial.set_user_attr("same_as", earlier.number)
        trial.set_user_attr("epochs", 0)
        trial.set_user_attr("epochs_reused", 0)
        for key, value in earlier.system_attrs.items():  # Trial.set_constraint stores "constraints:<name>"
            if key.startswith("constraints:"):
                trial.set_constraint(key.split(":", 1)[1], value)
        if earlier.state == TrialState.COMPLETE:
            self.study.tell(trial, earlier.values)
        else:  # stopped early, or (a twin in flight) failed
            self.study.tell(trial, state=TrialState.PRUNED if earlier.state == TrialState.PRUNED else TrialState.FAIL)
        log.info("trial #%d: the same candidate as trial #%d; told its figures, not run again and not counted",
                 trial.number, earlier.number)

    def _loop(self, pool: Any) -> None:
        """The sampler's loop: a trial asked whenever a worker is free, told as it finishes; the first one the
        setup's own chain with ``search.start_with_setup``."""
        if self.scfg.start_with_setup and not self.study.trials:
            initial = self.space.initial_params()
            if initial is None:
                log.warning("search.start_with_setup: the setup's own chain has a value outside the search space "
                            "(a narrowed range, off its grid); the first trial is drawn instead")
            else:
                self.submit(pool, initial, {"initial": True})
        while True:
            while len(self.in_flight) < pool.slots and self.remaining:
                self.submit(pool, *(self.continuation() or ()))
            if not self.in_flight:
                break
            self.collect(pool, timeout=30)

    def _tell(self, trial: Any, fid: Any, outcome: dict) -> Optional[dict]:
        def close_fid(state, value=None):
            if fid is not None:
                self.fidelity.tell(fid, value if state == TrialState.COMPLETE else None, state=state)

        trial.set_user_attr("wall_s", outcome.get("wall_s"))
        trial.set_user_attr("worker", outcome.get("worker"))
        self._note_references(trial.number, f"trial_{trial.number:04d}", outcome.get("value"))
        if outcome.get("lost"):
            key = json.dumps(trial.params, sort_keys=True, default=str)
            self.retries[key] = self.retries.get(key, 0) + 1
            if self.retries[key] <= self.scfg.retries:
                trial.set_user_attr("lost", True)
                self.study.enqueue_trial(trial.params, user_attrs=_rerun_attrs(trial), skip_if_exists=False)
                log.warning("trial #%d lost its worker (%s): asked again with the same parameters", trial.number,
                            outcome.get("error"))
                self.study.tell(trial, state=TrialState.FAIL)
                close_fid(TrialState.FAIL)
                return None
        if outcome["status"] != "completed":
            trial.set_user_attr("error", outcome.get("error"))
            self.study.tell(trial, state=TrialState.FAIL)
            close_fid(TrialState.FAIL)
            return self._row(self.study.trials[trial.number])
        value = outcome["value"]
        self._note_split(value)
        rows = value.get("metrics") or []
        if not self.reference.get("row") and rows and trial.user_attrs.get("start_node") == 0:
            # no prefix ran: the trial's input row (test split) and its input model's validation figures
            self._set_reference({"row": rows[0], **_val_figures(value, "input_")})
        elif f"val_{self.quality}" in self.reference and self.reference[f"val_{self.quality}"] is None \
                and isinstance(value.get(f"input_val_{self.quality}"), (int, float)):
            self._set_reference({**self.reference, **_val_figures(value, "input_")})
        last = rows[-1] if rows else {}
        trial.set_user_attr("metrics", {k: v for k, v in last.items() if isinstance(v, (int, float, str))})
        for name in dict.fromkeys(("accuracy", "loss", self.quality)):
            trial.set_user_attr(f"val_{name}", value.get(f"val_{name}"))
        trial.set_user_attr("output_dir", value.get("output_dir"))
        trial.set_user_attr("epochs", value.get("epochs"))
        trial.set_user_attr("epochs_reused", value.get("epochs_reused"))
        trial.set_user_attr("kept_structure", kept_structure(rows))
        line = self._line()
        acc = self._selected(value, last, self.quality)
        if line is not None:
            violation = line - acc if isinstance(acc, (int, float)) else 1.0
            trial.set_constraint("accuracy_drop", violation if value["state"] == "complete" else max(violation, 1e-9))
            trial.set_user_attr("feasible", violation <= 0 and value["state"] == "complete")
        if value["state"] == "pruned":
            trial.set_user_attr("reason", value.get("reason"))
            self.study.tell(trial, state=TrialState.PRUNED)
            close_fid(TrialState.PRUNED)
            if value.get("output_dir"):  # the nodes it finished are as good a start as a complete trial's
                self._register(trial.user_attrs["nodes"], trial.user_attrs["start_node"], value["output_dir"])
        else:
            values = [self._selected(value, last, o) for o in self.scfg.objectives]
            if not all(isinstance(v, (int, float)) for v in values):
                missing = [o for o, v in zip(self.scfg.objectives, values) if not isinstance(v, (int, float))]
                trial.set_user_attr("error", f"objective(s) {missing} not measured (no labels?)")
                self.study.tell(trial, state=TrialState.FAIL)
                close_fid(TrialState.FAIL)
            else:
                self.study.tell(trial, values)
                close_fid(TrialState.COMPLETE, acc if isinstance(acc, (int, float)) else 0.0)
                self._register(trial.user_attrs["nodes"], trial.user_attrs["start_node"], value["output_dir"])
        return self._row(self.study.trials[trial.number])

    def _register(self, nodes: list[dict], start: int, output_dir: str) -> None:
        """Every node checkpoint a trial finished (complete, or stopped early at a node end: the nodes before the
        stop are finished) becomes a computed prefix other trials may start from."""
        if not self.scfg.share_prefix:
            return
        common = {**self.space.common, "seed": self.base_seed}
        for j in range(start + 1, len(nodes) + 1):
            folder = Path(output_dir) / "nodes" / f"{j - start}_{nodes[j - 1]['kind']}"
            if (folder / "manifest.json").exists():
                self.cache.put(prefix_key(self.identity, common, nodes[:j]), folder)

    # -- results -------------------------------------------------------------------------------------------
    def _row(self, t: Any) -> dict:
        state = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(t.state.name, t.state.name.lower())
        return trial_row(t.number, state, t.user_attrs, t.params, self.reference, self.quality)

    def _rows(self) -> list[dict]:
        return [self._row(t) for t in self.study.get_trials(deepcopy=False)
                if t.state.is_finished() and not t.user_attrs.get("lost")]

    def _front(self) -> list[dict]:
        trials = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if t.user_attrs.get("same_as") is None]
        if self.scfg.max_accuracy_drop is not None:
            trials = [t for t in trials if t.user_attrs.get("feasible")]
        keys = {t.number: self._signed(t.values) for t in trials}
        return [self._row(t) for t in trials if not any(_dominates(b, keys[t.number]) for b in keys.values())]

    def _best(self) -> Optional[dict]:
        """The front's trial best on the first objective (as selected: validation accuracy / loss)."""
        front = self._front()
        if not front:
            return None
        sign = 1 if self.scfg.directions()[0] == "minimize" else -1
        return min(front, key=lambda r: sign * self.study.trials[r["trial"]].values[0])

    def _report(self) -> SearchResult:
        rows = self._rows()
        front = self._front()
        write_csv(self.folder / "trials.csv", rows, summary_columns(self.quality))
        write_csv(self.folder / "pareto.csv", front, summary_columns(self.quality))
        command = self._rerun_command()
        (self.folder / "pareto").mkdir(exist_ok=True)
        for row in front:
            t = self.study.trials[row["trial"]]
            path = self.folder / "pareto" / f"trial_{row['trial']:04d}.yaml"
            text = setup_yaml(f"{self.setup.name}_T{row['trial']}", self.space.common, t.user_attrs["nodes"],
                              command.replace("<FILE>", str(path)), t.user_attrs.get("metrics") or {})
            path.write_text(text)
        split = "validation" if self.on_validation else "test"
        refs = reference_rows(self.reference_folders, self.state.get("reference_points") or {}, self.reference,
                              self.quality)
        for ref in refs:
            drawn = figure_points([ref], self.scfg.objectives, split, self.quality)
            ref["plotted_split"] = drawn[0]["split"] if drawn else None
        write_csv(self.folder / "reference_points.csv", refs, reference_columns(self.quality))
        try:
            plot_front(self.folder / "pareto.png", rows, front, self.scfg.objectives,
                       figure_points(refs, self.scfg.objectives, split, self.quality), self._line(), split,
                       self.quality)
        except Exception as err:  # noqa: BLE001 - a plot never fails the search
            log.warning("pareto.png not written: %s", err)
        best = self._best()
        feasible = best is not None or self.scfg.max_accuracy_drop is None
        message = self._final_message(rows, best)
        self.state.update(trials_finished=self._finished(), best=best, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        return SearchResult(self.folder, rows, front, best, self.reference, message, feasible, self.study)

    def _final_message(self, rows: list[dict], best: Optional[dict]) -> str:
        if best is not None:
            return (f"best under the constraint: trial #{best['trial']} {best['chain']}: "
                    f"{_describe(best, self.scfg.objectives, self.quality)}; setup: "
                    f"{self.folder / 'pareto' / ('trial_%04d.yaml' % best['trial'])}")
        column = f"val_{self.quality}" if self.on_validation else self.quality
        measured = [r for r in rows if isinstance(r.get(column), (int, float))]
        line = self._line()
        if self.scfg.max_accuracy_drop is None or not measured or line is None:
            return "no trial completed" if not measured else "search finished"
        complete = [r for r in measured if r["state"] == "complete"]
        closest = max(complete or measured, key=lambda r: r[column])
        split = "validation" if self.on_validation else "test"
        return (f"no trial met the constraint ({split} {self.quality} >= {line:.4f}, at most "
                f"{self.scfg.max_accuracy_drop * 100:g} pt below {self._reference_quality():.4f}); closest: "
                f"trial #{closest['trial']} {closest['chain']} ({closest['state']}"
                f"{'' if closest['state'] == 'complete' else ', at its last finished node'}): "
                f"{_describe(closest, self.scfg.objectives, self.quality)}")

    def _summary_metrics(self, result: SearchResult) -> dict:
        repeats = sum(r.get("same_as") is not None for r in result.trials)
        out = {"trials_finished": float(len(result.trials) - repeats), "trials_repeated": float(repeats),
               "pareto_size": float(len(result.front))}
        if result.best:
            out.update({f"best_{k}": result.best[k] for k in ("macs_reduction", "val_accuracy_drop_pt",
                                                              "accuracy_drop_pt", f"val_{self.quality}_drop_pt",
                                                              f"{self.quality}_drop_pt", "latency_ratio",
                                                              "params_reduction")
                        if result.best.get(k) is not None})
        return out

    def _rerun_command(self) -> str:
        parts = ["fedcore-adapter", "setup=<FILE>"]
        for key in ("pretrained",):
            if self.cfg.get(key):
                parts.append(f"{key}={self.cfg[key]}")
        return " ".join(parts) + " (plus the search's model=/data= options)"

    def _named_runs(self) -> list[Path]:
        root = Path(self.cfg.get("output_dir") or "composition_results")
        out = []
        for name in named_setups():
            for candidate in (root / f"{name}_{self.label}", root / name):
                if (candidate / "metrics.json").exists():
                    out.append(candidate)
                    break
        return out


def run_search(cfg: Mapping[str, Any], *, model: Any = None, data: Any = None, loss: Any = None,
               model_label: Optional[str] = None, setup: Optional[Setup] = None,
               loop: Optional[Callable[[Search, Any], None]] = None) -> SearchResult:
    """Run the search a composed config describes (``cluster``: trials on Dask, else one after another here);
    ``loop``: another optimiser's loop instead of the sampler's (:meth:`Search.run`)."""
    search = Search(cfg, model=model, data=data, loss=loss, model_label=model_label, setup=setup)
    cluster = dict(cfg.get("cluster") or {})
    if cluster.get("name", "none") == "none" and not cluster.get("address") and not cluster.get("_target_"):
        return search.run(lambda: SequentialPool(run_trial), loop)
    # lazy: dask, imported only when a cluster runs the trials
    from ..distributed.cluster import open_client
    from ..distributed.pool import DaskPool

    with open_client(cluster) as client:
        return search.run(lambda: DaskPool(client, run_trial, cwd=os.getcwd()), loop)
