"""Many composed configurations run as Dask tasks, each into its own results folder, then one comparison.

``run_many(configs, cluster)`` takes the plain mappings ``jobs.run_from_config`` takes (what Hydra composes
for ``fedcore-adapter``), one per run: setups x models x seeds x overrides.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..building import DEFAULT_OUTPUT, DEFAULT_SETUP, run_from_config, setup_mapping, setup_overrides
from ..errors import FedcoreError
from ..sweep_report import compare_sweep
from ..tracking.parents import SWEEP_FILES, close_parents, open_parents, outcome
from .cluster import open_client
from .fanout import TaskResult, run_tasks

log = logging.getLogger("fedcore_adapter.distributed")
SWEEP_FILE = "sweep.json"


def run_config(payload: Mapping[str, Any]) -> dict:
    """Task body: run one composed configuration; return only small, picklable facts (not the model)."""
    result = run_from_config(payload["cfg"], model_label=payload.get("model_label"))
    return {"output_dir": str(Path(result.output_dir).absolute()), "status": result.status, "metrics": result.metrics}


def _setup(cfg: Mapping[str, Any]) -> Optional[dict]:
    """The setup ``cfg`` will run, as the mapping ``building`` validates on the worker (read here without
    importing torch); None when it does not resolve (the run itself reports why)."""
    try:
        return setup_mapping(cfg.get("setup") or DEFAULT_SETUP, setup_overrides(cfg))
    except (FedcoreError, OSError):
        return None


def planned_folder(cfg: Mapping[str, Any]) -> Optional[Path]:
    """Where the run of ``cfg`` will write its results (None when its setup does not resolve)."""
    setup = _setup(cfg) if "setup" in cfg else None
    if setup is None:
        return None
    name = setup.get("name") or "custom"
    return Path(cfg.get("output_dir") or DEFAULT_OUTPUT) / run_folder_name(name, cfg.get("model_name"))


def _epochs(node: Any) -> int:
    """Every ``epochs`` count in a node's parameters, nested ones (``finetune_params``) included."""
    if isinstance(node, Mapping):
        return sum(v if k == "epochs" and isinstance(v, int) else _epochs(v) for k, v in node.items())
    if isinstance(node, list):
        return sum(_epochs(v) for v in node)
    return 0


def estimated_work(cfg: Mapping[str, Any]) -> float:
    """A rough size of the run of ``cfg``, to start long runs first: per node, 1 + its epochs (pruning
    epochs counted once per iteration); 0 when the setup does not resolve (the run will report why)."""
    setup = _setup(cfg)
    if setup is None:
        return 0.0
    nodes = setup.get("nodes") or []
    work = 0.0
    for node in nodes:
        if isinstance(node, Mapping):
            iterations = node.get("pruning_iterations") if isinstance(node.get("pruning_iterations"), int) else 1
            own = node.get("epochs") if isinstance(node.get("epochs"), int) else 0
            work += 1 + _epochs(node) + own * (max(iterations, 1) - 1)
    return work


def run_folder_name(setup: str, model_name: Optional[str]) -> str:
    """``results.run_folder_name`` without importing torch (the launching process stays light)."""
    return f"{setup}_{model_name}" if model_name else setup


def separate_folders(cfgs: Sequence[dict], job_dirs: Sequence[Path]) -> list[Optional[Path]]:
    """Runs of a sweep that share a results root each write into their own job folder (``output_dir`` set to
    ``job_dirs[i]``, in place), as under the Hydra launchers, so no two runs share a folder and ``compare <sweep
    folder>`` finds them all; a run given a root of its own keeps it. Returns every run's folder (None where the
    setup does not resolve)."""
    folders = [planned_folder(c) for c in cfgs]
    roots = Counter(str(Path(c.get("output_dir") or DEFAULT_OUTPUT)) for c in cfgs)
    for i, folder in enumerate(folders):
        if folder is not None and roots[str(Path(cfgs[i].get("output_dir") or DEFAULT_OUTPUT))] > 1:
            cfgs[i]["output_dir"] = str(job_dirs[i])
            folders[i] = Path(job_dirs[i]) / folder.name
    return folders


def default_sweep_dir(cfgs: Sequence[Mapping[str, Any]]) -> Path:
    root = next((c.get("output_dir") for c in cfgs if c.get("output_dir")), "composition_results")
    return Path(root) / "sweeps" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _folder(result: TaskResult) -> Optional[str]:
    return (result.value if isinstance(result.value, Mapping) else {}).get("output_dir")


def write_sweep_record(results: Sequence[TaskResult], out: Path,
                       folders: Optional[Sequence[Optional[Path | str]]] = None) -> Path:
    """``sweep.json``: every task's label, status, error, worker, wall time and results folder."""
    rows = []
    for i, r in enumerate(results):
        row = r.record()
        folder = folders[i] if folders is not None else _folder(r)
        row["output_dir"] = str(folder) if folder and r.status == "completed" else None
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SWEEP_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(rows, indent=2, default=str))
    os.replace(tmp, path)
    return path


def summary(results: Sequence[TaskResult], folders: Optional[Sequence[Optional[Path | str]]] = None) -> str:
    """One line per run: status, wall time, and its results folder or its error."""
    lines = []
    for i, r in enumerate(results):
        folder = folders[i] if folders is not None else _folder(r)
        what = (folder or "") if r.status == "completed" else r.error
        wall = f"{r.wall_s:7.1f}s" if r.wall_s is not None else "      -"
        lines.append(f"#{r.index:<3} {r.status:<9} {wall}  {r.label}  ->  {what}")
    done = sum(r.status == "completed" for r in results)
    lines.append(f"{done}/{len(results)} completed, {len(results) - done} failed")
    return "\n".join(lines)


def longest_first(work: Sequence[float]) -> list[int]:
    """Submission order: the largest estimated work first (ties keep their order), so that the last runs
    to start are short ones and the workers finish together (longest-processing-time scheduling)."""
    return sorted(range(len(work)), key=lambda i: -work[i])


def run_many(configs: Sequence[Mapping[str, Any]], cluster: Any = None, *, labels: Optional[Sequence[str]] = None,
             model_labels: Optional[Sequence[Optional[str]]] = None, indices: Optional[Sequence[int]] = None,
             sweep_dir: Optional[str | Path] = None, failed: Sequence[TaskResult] = (),
             heartbeat_s: float = 30.0) -> list[TaskResult]:
    """Run every composed configuration as one Dask task on ``cluster`` (default: the first config's
    ``cluster``); then write ``sweep.json`` and the comparison into ``sweep_dir``. Failed runs are results
    (``failed``: runs that failed before they could be submitted, recorded with the others). Runs are
    submitted longest first (``estimated_work``); a worker takes its next run when it finishes one."""
    cfgs = [copy.deepcopy(dict(c)) for c in configs]
    if not cfgs and not failed:
        return []
    labels = list(labels) if labels else [f"{c.get('setup', 'RAW')} {c.get('model_name') or ''}".strip() for c in cfgs]
    model_labels = list(model_labels) if model_labels else [None] * len(cfgs)
    indices = list(indices) if indices is not None else list(range(len(cfgs)))
    out = Path(sweep_dir) if sweep_dir else default_sweep_dir(cfgs)
    separate_folders(cfgs, [out / str(i) for i in indices])

    parents = open_parents(cfgs, name=f"sweep {out.name}", model_labels=model_labels,
                           tags={"fedcore.sweep_dir": str(out)})
    payloads = [{"cfg": c, "model_label": m} for c, m in zip(cfgs, model_labels)]
    results: list[TaskResult] = []
    if cfgs:
        with open_client(cluster if cluster is not None else cfgs[0].get("cluster")) as client:
            results = run_tasks(client, run_config, payloads, labels, indices=indices, cwd=os.getcwd(),
                                heartbeat_s=heartbeat_s, order=longest_first([estimated_work(c) for c in cfgs]))
    results = sorted([*results, *failed], key=lambda r: r.index)
    write_sweep_record(results, out)
    compare_sweep([r.value["output_dir"] for r in results if r.status == "completed"], out)
    close_parents(parents, *outcome([r.status for r in results]), [out / name for name in SWEEP_FILES])
    return results
