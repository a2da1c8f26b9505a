"""The MLflow engine hook: one parent run per setup execution, one nested child run per node.

Each engine event becomes a few records (plain dicts) streamed to a logger process
(:class:`~.channel.LoggerProcess`), so training never imports mlflow nor waits on the store:

- parent (named ``<SETUP> · <model> · seed=<seed>`` and the setup's overrides, unique in its
  experiment; nested under ``parent_run_id``, a sweep's or a search's run, when given): the
  flattened configuration and package versions as params; each row's metrics at ``step = node
  index`` (row 0 also as ``input_<metric>``, the baseline), so the latest value is the final
  model's; at the end the headline against the input (``records.headline``: ``size_mb_ratio``,
  ``compression_ratio``, ``speedup``, ``accuracy_delta_pt``...); tags ``fedcore.setup``,
  ``fedcore.status``, ``fedcore.chain``, git commit; artifacts ``config.yaml``,
  ``metrics.csv``, ``metrics_by_node.png`` and the final model under ``model/``.
- child per node: the node's fields as params, its row's metrics, training curves
  (``train_loss``, ``val_loss``, ``val_accuracy``... with the epoch as step), tags
  ``fedcore.node_kind`` / ``fedcore.node_index`` / ``fedcore.status``, and the files of
  its checkpoint folder but the weights (manifest, decompose config, pruning history...).
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from ..hooks import Hook, RunInfo
from ..results import PARTIAL_SUFFIX
from .channel import LoggerSession
from .config import TrackingConfig, default_experiment, model_label, parse_tracking_config, resolve_uri
from .records import (StepCounter, default_run_name, flatten, git_commit, headline, numeric_metrics, run_params, short,
                      text_tags)
from .store import headline_url

log = logging.getLogger("fedcore_adapter")
PLOT_FILE = "metrics_by_node.png"
INTERRUPT_FLUSH_S = 10.0
# at most this long, before the input model is measured, for the logger process to finish starting (mlflow's
# imports, the store's schema, the run's opening take a core for seconds: beside them, on 2 cores, the input
# model's latency read twice its own); a dead or slow server costs a run this once, never more
SETTLE_S = 10.0
MODEL_README = """# Final model of this run (fedcore_adapter checkpoint format)

`state.pt` holds the tensors (load with `weights_only=True`), `manifest.json` the structural
changes to replay on a freshly built original model. Load it with:

```python
from fedcore_adapter.tracking import load_logged_model
model = load_logged_model("<run_id>", build_original_model(), tracking_uri="<uri>")
```
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


class MlflowHook(Hook):
    """Logs a run to MLflow. ``MlflowHook(uri=..., experiment=..., log_model=...)`` (see ``TrackingConfig``)."""

    def __init__(self, config: TrackingConfig | dict | None = None, **fields: Any):
        base = config.model_dump() if isinstance(config, TrackingConfig) else dict(config or {})
        self.config = parse_tracking_config({**base, **fields})
        self.uri = resolve_uri(self.config.uri)  # relative SQLite paths: the working directory of now
        self.sink = None
        self._output_dir = Path(".")
        self._keys: dict[int, str] = {}
        self._closed: set[str] = set()
        self._steps = StepCounter()
        self.model_label: Optional[str] = None  # names the run; default: from the run's config

    # -- engine events -------------------------------------------------------------------------------
    def before_run(self, run: RunInfo) -> None:
        experiment = self.config.experiment or default_experiment(run.config, None)
        previous = run.state.get("mlflow", {})
        parent_id = previous.get("parent_run_id") if previous.get("tracking_uri") == self.uri else None
        run.state["mlflow"] = {"tracking_uri": self.uri, "experiment": experiment, "parent_run_id": parent_id}
        target = {"op": "target", "uri": self.uri, "experiment": experiment}
        self._output_dir = Path(run.output_dir).resolve()  # the logger process may have another working directory
        self._keys, self._closed = {}, set()
        self.sink = LoggerSession(self._output_dir, target, log.warning, http_timeout_s=self.config.http_timeout_s,
                                  http_retries=self.config.http_retries)
        setup = run.setup
        tags = {"fedcore.role": "setup", "fedcore.setup": setup.name, "fedcore.status": "running",
                "fedcore.chain": " -> ".join(n.kind for n in setup.nodes),
                "fedcore.results_dir": str(self._final_dir(run)), **self.config.tags}
        if run.resumed and parent_id:
            tags["fedcore.resumed"] = "true"
        if self.config.parent_run_id:
            tags["mlflow.parentRunId"] = self.config.parent_run_id
        if setup.description:
            tags["mlflow.note.content"] = short(setup.description)
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        self._submit(target)
        self._submit({"op": "open_parent", "key": "parent", "run_id": parent_id, "tags": tags,
                      "name": self.config.run_name or self._run_name(run)})
        self._submit({"op": "params", "key": "parent", "params": run_params(run.config)})
        if not self.sink.settle(SETTLE_S):  # the input model is measured next: not beside the logger's start-up
            log.info("tracking: the logger was still starting after %g s; measuring the input model anyway",
                     SETTLE_S)

    def after_measure_input(self, run: RunInfo, row: dict, checkpoint: Path) -> None:
        self._metrics("parent", {**numeric_metrics(row), **numeric_metrics(row, prefix="input_")}, 0)
        self._submit({"op": "tags", "key": "parent", "tags": {  # the input row's text columns (compare reads them)
            f"fedcore.input_{k[len('fedcore.'):]}": v for k, v in text_tags(row).items()}})

    def before_node(self, run: RunInfo, index: int, node: Any) -> None:
        self._remember_parent(run)
        key = self._keys[index] = f"node{index + 1}-{uuid.uuid4().hex[:12]}"
        self._steps = StepCounter()
        tags = {"fedcore.role": "node", "fedcore.setup": run.setup.name, "fedcore.node": node.label,
                "fedcore.node_kind": node.kind, "fedcore.node_index": str(index + 1), "fedcore.status": "running"}
        self._submit({"op": "open_child", "key": key, "name": f"{index + 1}_{node.label}", "tags": tags})
        self._submit({"op": "params", "key": key, "params": flatten(node.model_dump(mode="json"))})

    def on_log(self, run: RunInfo, index: int, node: Any, metrics: dict, step: Optional[int]) -> None:
        self._remember_parent(run)
        by_step: dict[int, dict] = {}
        for name, value in numeric_metrics(metrics).items():
            by_step.setdefault(self._steps.step(name, step), {})[name] = value
        for at, values in by_step.items():
            self._metrics(self._keys.get(index, "parent"), values, at)

    def after_node(self, run: RunInfo, index: int, node: Any, model: Any, row: dict, checkpoint: Path) -> None:
        self._remember_parent(run)
        key = self._keys.get(index)
        if key is not None:
            self._metrics(key, numeric_metrics(row), 0)
            self._submit({"op": "tags", "key": key, "tags": text_tags(row)})
            self._submit({"op": "artifacts", "key": key, "src": self._relative(checkpoint), "exclude": ["state.pt"]})
            self._close(key, "completed")
        self._metrics("parent", numeric_metrics(row), index + 1)

    def after_run(self, run: RunInfo, result: Any) -> None:
        self._remember_parent(run)
        self._output_dir = Path(run.output_dir).resolve()
        if self.sink is not None:
            self.sink.move_folder(self._output_dir)
        rows = result.metrics
        if rows:
            self._metrics("parent", headline(rows[0], rows[-1]), len(rows) - 1)
        self._log_results_files()
        if self.config.log_model:
            self._log_model(run)
        self._close("parent", "completed")
        self._flush(run)

    def on_error(self, run: RunInfo, index: Optional[int], node: Any, error: BaseException) -> None:
        status = "killed" if isinstance(error, KeyboardInterrupt) else "failed"
        self._end(run, index, status, short(f"{type(error).__name__}: {error}"), self.config.flush_timeout_s)

    def on_interrupt(self, run: RunInfo, index: Optional[int], node: Any, signum: int) -> None:
        import signal

        # Ended KILLED; what is not sent within a few seconds stays in the journal (sent by the next run or resume).
        self._end(run, index, "killed", f"interrupted by {signal.Signals(signum).name}",
                  min(self.config.flush_timeout_s, INTERRUPT_FLUSH_S))

    def _end(self, run: RunInfo, index: Optional[int], status: str, reason_text: str, flush_timeout_s: float) -> None:
        self._remember_parent(run)
        reason = {"fedcore.error": reason_text}
        key = self._keys.get(index) if index is not None else None
        if key is not None and key not in self._closed:
            self._submit({"op": "tags", "key": key, "tags": reason})
            self._close(key, status)
        self._submit({"op": "tags", "key": "parent", "tags": reason})
        self._log_results_files()
        self._close("parent", status)
        self._flush(run, flush_timeout_s)

    # -- helpers -------------------------------------------------------------------------------------
    def _submit(self, record: dict) -> None:
        if self.sink is not None:
            self.sink.submit({**record, "time": _now_ms()})

    def _metrics(self, key: str, metrics: dict, step: int) -> None:
        if metrics:
            self._submit({"op": "metrics", "key": key, "metrics": metrics, "step": step})

    def _close(self, key: str, status: str) -> None:
        self._closed.add(key)
        self._submit({"op": "close", "key": key, "status": status})

    def _log_results_files(self) -> None:
        for name in ("config.yaml", "metrics.csv"):
            self._submit({"op": "artifacts", "key": "parent", "src": name})
        self._submit({"op": "plot", "key": "parent", "file": PLOT_FILE})

    def _log_model(self, run: RunInfo) -> None:
        self._submit({"op": "artifacts", "key": "parent", "src": "final", "dest": "model"})
        self._submit({"op": "text", "key": "parent", "file": "model/README.md",
                      "text": MODEL_README.replace("<uri>", self.uri)})
        try:
            manifest = json.loads((Path(run.output_dir) / "final" / "manifest.json").read_text())
            self._submit({"op": "tags", "key": "parent", "tags": {"fedcore.model_class": manifest["model_class"],
                                                                  "fedcore.model_artifact": "model"}})
        except (OSError, ValueError, KeyError):
            pass

    def _flush(self, run: RunInfo, timeout_s: Optional[float] = None) -> None:
        """Wait for the logger process (at most ``flush_timeout_s``), then note the parent run id."""
        if self.sink is not None:
            self.sink.close(self.config.flush_timeout_s if timeout_s is None else timeout_s)
            self._remember_parent(run)
            links = self.links()
            if links:
                log.info("MLflow run: %s  (setups side by side: %s)", links["run"], links["runs"])
            self.sink = None

    def _run_name(self, run: RunInfo) -> str:
        label = model_label(run.config, self.model_label)
        return default_run_name(run.setup.name, None if label == "model" else label, run.setup.common.seed, run.config)

    def links(self) -> dict[str, str]:
        """MLflow UI links of a tracking server: ``run`` (this setup run) and ``runs`` (the experiment's runs
        table with the headline columns); empty for a local store or before the run exists."""
        ids = self.sink.ids if self.sink is not None else {}
        if not self.uri.startswith(("http://", "https://")) or not ids.get("parent") or not ids.get("experiment"):
            return {}
        base = self.uri.rstrip("/")
        return {"run": f"{base}/#/experiments/{ids['experiment']}/runs/{ids['parent']}",
                "runs": headline_url(base, ids["experiment"])}

    def _remember_parent(self, run: RunInfo) -> None:
        """Copy the parent run id into ``run.state`` (persisted in run.json) from the engine's thread."""
        parent = self.sink.ids.get("parent") if self.sink is not None else None
        state = run.state.get("mlflow")
        if parent and isinstance(state, dict) and state.get("parent_run_id") != parent:
            state["parent_run_id"] = parent

    def _relative(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self._output_dir))
        except ValueError:
            return str(path)

    @staticmethod
    def _final_dir(run: RunInfo) -> Path:
        out = Path(run.output_dir).resolve()
        return out.with_name(out.name[: -len(PARTIAL_SUFFIX)]) if out.name.endswith(PARTIAL_SUFFIX) else out
