"""``fedcore-adapter sweep OVERRIDES...``: a list of runs on the Dask cluster, without Hydra multirun.

    fedcore-adapter sweep setup=raw,composite_1 model=mnist1d_cnn,digits_cnn common.seed=1,2 cluster=local

Comma-separated values expand into every combination (setups x models x seeds x overrides), as with
``-m``. Each run is one Dask task writing its own results folder; when all have finished, the sweep
folder (``<output_dir>/sweeps/<time>``) gets ``sweep.json`` and the comparison table and plot.
Progress (done / running / queued / failed) is logged as runs finish. Exit status 1 if any run failed.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ..composition import normalize_argv
from ..errors import ConfigError, error_line
from ..resources import conf_dir
from .fanout import TaskResult
from .runs import default_sweep_dir, run_many, summary

log = logging.getLogger("fedcore_adapter.distributed")


def expand(overrides: list[str]) -> list[list[str]]:
    """Every combination of the comma-separated values, in Hydra's order (the last key varies fastest)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def varying(jobs: list[list[str]]) -> list[list[str]]:
    """Each job's overrides that differ between jobs (its label)."""
    jobs = [list(job) for job in jobs]
    if len(jobs) < 2 or len({len(job) for job in jobs}) > 1:
        return jobs
    return [[o for i, o in enumerate(job) if any(other[i] != o for other in jobs)] for job in jobs]


def compose_all(jobs: list[list[str]]) -> list[tuple[Optional[dict], Optional[str], Optional[str]]]:
    """``(plain config, model choice, error)`` for every job, composed as ``fedcore-adapter`` composes one."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    out = []
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        for job in jobs:
            try:
                cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
                choice = cfg.hydra.runtime.choices.get("model")
                with open_dict(cfg):
                    del cfg["hydra"]
                out.append((OmegaConf.to_container(cfg, resolve=True), choice, None))
            except Exception as err:  # noqa: BLE001 - a bad override fails its run only
                out.append((None, None, error_line(err)))
    return out


def _same_cluster(cfgs: list[dict]) -> Any:
    clusters = {repr(c.get("cluster")) for c in cfgs}
    if len(clusters) > 1:
        raise ConfigError("cluster cannot vary within a sweep (the runs share one cluster); "
                          "run one sweep per cluster")
    return cfgs[0].get("cluster") if cfgs else None


def main(argv: list[str]) -> int:
    """Entry point of ``fedcore-adapter sweep``."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    flags = [a for a in argv if a.startswith("-")]
    if flags:
        raise ConfigError(f"sweep takes overrides only (got {flags[0]!r}); e.g. fedcore-adapter sweep "
                          f"setup=raw,composite_1 common.seed=1,2 cluster=local")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("fedcore_adapter").setLevel(logging.INFO)
    jobs = expand(normalize_argv(argv))
    labels = [" ".join(v) or "(defaults)" for v in varying(jobs)]
    composed = compose_all(jobs)
    ok = [i for i, (cfg, _, _) in enumerate(composed) if cfg is not None]
    failed = [TaskResult(i, labels[i], "failed", error=err) for i, (cfg, _, err) in enumerate(composed) if cfg is None]
    cfgs = [composed[i][0] for i in ok]
    for i, job in enumerate(jobs):
        log.info("#%d : %s", i, " ".join(job) or "(defaults)")
    for r in failed:
        log.error("#%d %s: FAILED: %s", r.index, r.label, r.error)
    sweep_dir = default_sweep_dir(cfgs or [{}])
    results = run_many(cfgs, _same_cluster(cfgs), labels=[labels[i] for i in ok],
                       model_labels=[c.get("model_name") or composed[i][1] for i, c in zip(ok, cfgs)],
                       indices=ok, sweep_dir=sweep_dir, failed=failed)
    print(summary(results))
    print(f"sweep: {sweep_dir}")
    return 0 if all(r.status == "completed" for r in results) else 1

