"""The Dask launcher's work: compose each job here, run it as a task through ``fedcore_adapter.distributed``.

Jobs are composed on the launching side (a composition error fails that job only), sent with Hydra's
global state, and run on a worker by Hydra's own ``run_job`` (in the launching folder when it exists
there). Each fedcore_adapter job writes its results into its own job folder, and
when all jobs have finished the sweep folder gets ``sweep.json`` and the comparison table and plot.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals

from fedcore_adapter.distributed.cluster import open_client
from fedcore_adapter.distributed.fanout import TaskResult, run_tasks
from fedcore_adapter.distributed.runs import estimated_work, longest_first, planned_folder, summary, write_sweep_record
from fedcore_adapter.distributed.sweep import varying
from fedcore_adapter.errors import error_line
from fedcore_adapter.sweep_report import compare_sweep
from fedcore_adapter.tracking.parents import SWEEP_FILES, close_parents, open_parents, outcome

log = logging.getLogger(__name__)


class JobFailed(CompactHydraException):
    """A job's error, carried back from its worker as one line (Hydra prints it without a traceback)."""


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - e.g. exceptions with extra required constructor arguments
        return JobFailed(error_line(err))


def execute_job(payload: tuple) -> JobReturn:
    """Worker side: one job through Hydra's ``run_job``, with the launching process's Hydra state."""
    sweep_config, hydra_context, task_function, singleton_state = payload
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(sweep_config)
    ret = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    if ret.status == JobStatus.FAILED:
        ret._return_value = _picklable(ret._return_value)
    return ret


def _job_error(ret: Any) -> Optional[str]:
    if isinstance(ret, JobReturn) and ret.status == JobStatus.FAILED:
        return error_line(ret._return_value) if isinstance(ret._return_value, BaseException) else "failed"
    return None


def _failed_return(overrides: Sequence[str], error: str, config: Optional[DictConfig] = None) -> JobReturn:
    ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED, hydra_cfg=config)
    if config is not None:
        task_cfg = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
        ret.cfg = task_cfg
    ret._return_value = JobFailed(error)
    return ret


def _compose(launcher: Any, overrides: Sequence[str], idx: int, sweep_dir: Path) -> DictConfig:
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.job.id = idx
        config.hydra.job.num = idx
        config.hydra.sweep.dir = str(sweep_dir)  # resolved once, here, for every job
    return config


def _plain(config: DictConfig) -> Optional[dict]:
    """The job's config as ``fedcore_adapter.building.run_from_config`` sees it, for fedcore_adapter apps (None
    otherwise)."""
    if "setup" not in config or "output_dir" not in config:
        return None
    try:
        return OmegaConf.to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), resolve=True)
    except Exception:  # noqa: BLE001 - the job reports its own error when it runs
        return None


def _job_dir(config: DictConfig, sweep_dir: Path) -> Path:
    try:
        return sweep_dir / str(OmegaConf.select(config, "hydra.sweep.subdir"))
    except Exception:  # noqa: BLE001
        return sweep_dir / str(config.hydra.job.num)


def _separate_result_folders(configs: list[DictConfig], sweep_dir: Path) -> list[Optional[Path]]:
    """Every fedcore_adapter job writes into its own job folder (``<sweep dir>/<job number>``), as under
    Hydra's basic launcher (``fedcore_adapter.cli.job_output_dir``); returns every job's results folder."""
    folders: list[Optional[Path]] = []
    for config in configs:
        plain = _plain(config)
        folder = planned_folder(plain) if plain is not None else None
        if folder is not None:
            job_dir = _job_dir(config, sweep_dir)
            with open_dict(config):
                config.output_dir = str(job_dir)
            folder = job_dir / folder.name
        folders.append(folder)
    return folders


def _nest_under_sweep_runs(configs: list[DictConfig], sweep_dir: Path) -> list:
    """Open the sweep's MLflow parent runs (one per experiment) and point each job's tracking at its own."""
    plains = [_plain(c) or {} for c in configs]
    labels = [p.get("model_name") or OmegaConf.select(c, "hydra.runtime.choices.model", default=None)
              for p, c in zip(plains, configs)]
    parents = open_parents(plains, name=f"sweep {sweep_dir.name}", model_labels=labels,
                           tags={"fedcore.sweep_dir": str(sweep_dir)})
    for config, plain in zip(configs, plains):
        parent = (plain.get("tracking") or {}).get("parent_run_id")
        if parent:
            with open_dict(config):
                config.tracking.parent_run_id = parent
    return parents


def _cluster_spec(launcher: Any) -> Any:
    if launcher.cluster:
        return OmegaConf.to_container(launcher.cluster, resolve=True) if isinstance(launcher.cluster, DictConfig) \
            else dict(launcher.cluster)
    spec = OmegaConf.select(launcher.config, "cluster", default=None)
    return OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else spec


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    setup_globals()
    assert launcher.config is not None and launcher.task_function is not None and launcher.hydra_context is not None
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("Launching %d jobs on Dask", len(job_overrides))
    labels = [" ".join(v) or "(defaults)" for v in varying([filter_overrides(o) for o in job_overrides])]
    results: list[Optional[TaskResult]] = [None] * len(job_overrides)
    configs: dict[int, DictConfig] = {}
    for i, overrides in enumerate(job_overrides):
        log.info("\t#%d : %s", initial_job_idx + i, labels[i])
        try:
            configs[i] = _compose(launcher, overrides, initial_job_idx + i, sweep_dir)
        except Exception as err:  # noqa: BLE001 - a job that cannot be composed fails alone
            results[i] = TaskResult(initial_job_idx + i, labels[i], "failed", error=error_line(err))
            log.error("\t#%d : FAILED: %s", initial_job_idx + i, results[i].error)
    positions = sorted(configs)
    folders = dict(zip(positions, _separate_result_folders([configs[i] for i in positions], sweep_dir)))
    parents = _nest_under_sweep_runs([configs[i] for i in positions], sweep_dir)
    state = Singleton.get_state()
    if positions:
        payloads = [(configs[i], launcher.hydra_context, launcher.task_function, state) for i in positions]
        with open_client(_cluster_spec(launcher)) as client:
            ran = run_tasks(client, execute_job, payloads, [labels[i] for i in positions],
                            indices=[initial_job_idx + i for i in positions],
                            cwd=str(configs[positions[0]].hydra.runtime.cwd),
                            heartbeat_s=launcher.heartbeat_s, error_of=_job_error,
                            order=longest_first([estimated_work(_plain(configs[i]) or {}) for i in positions]))
        for i, result in zip(positions, ran):
            results[i] = result
    done = [r for r in results if r is not None]
    result_folders = [folders.get(i) for i in range(len(job_overrides))]
    log.info("sweep summary:\n%s", summary(done, result_folders))
    if launcher.report:
        write_sweep_record(done, sweep_dir, result_folders)
        compare_sweep([f for f, r in zip(result_folders, done) if f is not None and r.status == "completed"],
                      sweep_dir)
    if parents:
        close_parents(parents, *outcome([r.status for r in done]), [sweep_dir / name for name in SWEEP_FILES])
    return [r.value if isinstance(r.value, JobReturn) else _failed_return(job_overrides[i], r.error or "failed",
                                                                             configs.get(i))
            for i, r in enumerate(done)]
