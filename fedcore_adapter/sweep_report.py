"""The end of a sweep: the comparison table (what ``fedcore-adapter compare`` writes), printed and saved in
the sweep folder, whichever launcher ran it.

:func:`compare_sweep` is the one function: the basic launcher reaches it through :class:`SweepComparison`
(a Hydra callback, ``hydra.callbacks`` in conf/config.yaml), the Dask launcher and the ``sweep`` command
through ``distributed.runs``. A multirun job notes where its results went (:func:`note_results_folder`) in
its own job folder, which is what the callback reads.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .errors import error_line
from .report import main as report_main

log = logging.getLogger("fedcore_adapter")
RESULTS_POINTER = "results_folder.txt"
_OWN_REPORT_LAUNCHERS = ("fedcore_dask_launcher",)  # launchers that call compare_sweep themselves


def compare_sweep(folders: Sequence[Optional[Path | str]], out: Path | str) -> bool:
    """Print the comparison of the runs in ``folders`` and write it (CSV, Markdown, plot) into ``out``.
    Never raises: every run's own results are already on disk; returns whether it was written."""
    folders = [str(f) for f in folders if f and Path(f).is_dir()]
    if not folders:
        return False
    try:
        code = report_main([*folders, "--out", str(out)])
    except (Exception, SystemExit) as err:  # noqa: BLE001 - see the docstring
        log.warning("comparison not written: %s", error_line(err, typed=False))
        return False
    if code:
        log.warning("comparison not written (report exited with %s)", code)
        return False
    log.info("comparison of %d run(s) written to %s", len(folders), out)
    return True


def note_results_folder(folder: Path | str) -> None:
    """In a multirun job, write the run's results folder into the job's own folder (``<sweep>/<job>``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / RESULTS_POINTER).write_text(str(Path(folder).absolute()) + "\n")


def _job_order(path: Path) -> tuple:
    name = path.parent.name
    return (0, int(name)) if name.isdigit() else (1, name)


class SweepComparison(Callback):
    """At the end of a multirun: :func:`compare_sweep` over the results folders its jobs noted."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        if any(name in launcher for name in _OWN_REPORT_LAUNCHERS):
            return
        sweep = Path(str(config.hydra.sweep.dir))
        pointers = sorted(sweep.glob(f"*/{RESULTS_POINTER}"), key=_job_order)
        compare_sweep([Path(p.read_text().strip()) for p in pointers], sweep)
