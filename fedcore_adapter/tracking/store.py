"""The MLflow side: the only module of the package that imports mlflow.

:class:`Replayer` applies logging records (plain dicts, see ``hook.py``) to a
tracking store through ``MlflowClient``; the live hook and ``sync_pending`` share
it. Records name runs by key (``parent``, ``node1-<token>``); the replayer maps
keys to MLflow run ids.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..errors import ConfigError
from .config import resolve_uri
from ..plots import plot_nodes
from .records import TEXT_COLUMNS

COUNT_METRICS = ("params", "macs", "batch_size")
STATUS = {"completed": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
_SKIP_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"}
_ENV_SET_HERE: set[str] = set()
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3: "genai_development" or "custom_model_development"
TRAINING_KIND = "custom_model_development"
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # MLflow UI: saved runs-table views, opened by viewStateShareKey
HEADLINE_VIEW = "fedcore-headline"
HEADLINE_COLUMNS = ("accuracy", "accuracy_delta_pt", "compression_ratio", "size_mb", "params_ratio", "macs_ratio",
                    "latency_ms", "speedup", "throughput_sps")


class SkipRecord(Exception):
    """A record the store rejects for its content (not for being unreachable): dropped, never retried."""


def is_unreachable(err: BaseException) -> bool:
    """True when ``err`` means the store could not be reached (retry later), not that the record is bad."""
    if isinstance(err, SkipRecord):
        return False
    return getattr(err, "error_code", None) not in _SKIP_CODES


def _set_http_limits(timeout_s: float, retries: int) -> None:
    """MLflow reads its HTTP limits from the environment; set them unless the user did."""
    for name, value in (("MLFLOW_HTTP_REQUEST_TIMEOUT", timeout_s), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", retries)):
        if name not in os.environ or name in _ENV_SET_HERE:
            os.environ[name] = str(int(value) if float(value).is_integer() else value)
            _ENV_SET_HERE.add(name)


def probe(uri: str, timeout_s: float = 3.0) -> None:
    """Raise ConnectionError when an HTTP tracking server does not answer ``/health``."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as err:
        raise ConnectionError(f"tracking server {uri} is unreachable ({type(err).__name__})") from None


@contextlib.contextmanager
def _init_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a SQLite store across processes (MLflow's table creation is not safe to race)."""
    if not uri.startswith("sqlite:") or os.name == "nt":
        yield
        return
    import fcntl

    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"fedcore_adapter_mlflow_{digest}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def connect(uri: Optional[str], experiment: Optional[str] = None, *, http_timeout_s: float = 10.0,
            http_retries: int = 2) -> tuple[Any, Optional[str]]:
    """An ``MlflowClient`` for ``uri`` and the id of ``experiment`` (created when missing)."""
    uri = resolve_uri(uri)
    _set_http_limits(http_timeout_s, http_retries)
    probe(uri, http_timeout_s)
    # lazy: mlflow costs seconds of start-up; only the processes that talk to the store import it
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with _init_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        if experiment is None:
            return client, None
        found = client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        if found is not None:
            _mark_training_experiment(client, found)
            return client, found.experiment_id
        try:
            return client, client.create_experiment(experiment,
                                                    artifact_location=local_artifact_location(uri, experiment),
                                                    tags=experiment_tags())
        except MlflowException as err:  # another process created it first
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client, client.get_experiment_by_name(experiment).experiment_id


def local_artifact_location(uri: str, experiment: str) -> Optional[str]:
    """Beside a SQLite store, ``<store folder>/mlruns/<experiment>``: MLflow's default ``./mlruns`` would follow the
    working directory of the logging process, not the store (None for servers, which choose their own)."""
    if not uri.startswith("sqlite:///"):
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("_") or "experiment"
    return str(Path(uri[len("sqlite:///"):]).parent / "mlruns" / slug)


def experiment_tags() -> dict[str, str]:
    """A model-training experiment (MLflow 3's UI shows its runs, not the GenAI overview) and the headline
    view of its runs table (open it with ``?viewStateShareKey=`` + ``HEADLINE_VIEW``)."""
    return {EXPERIMENT_KIND_TAG: TRAINING_KIND, f"{SHARED_VIEW_PREFIX}{HEADLINE_VIEW}": json.dumps(headline_view())}


def headline_view() -> dict:
    """MLflow UI state of the runs table: the setup runs' headline metrics as columns, newest first, the run
    names wide enough to read (MLflow's column ids)."""
    metrics = [f"metrics.`{name}`" for name in HEADLINE_COLUMNS]
    return {"selectedColumns": metrics, "orderByKey": "attributes.start_time", "orderByAsc": False,
            "columnOrder": ["attributes.`Run Name`", "runDateAndNestInfo", "duration", *metrics],
            "columnWidths": {"attributes.`Run Name`": 400, **{column: 125 for column in metrics}}}


def headline_url(server: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI of ``server``, model-training side, headline columns."""
    return (f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={HEADLINE_VIEW}")


def _mark_training_experiment(client: Any, experiment: Any) -> None:
    """Tag an existing experiment as model training unless someone chose another kind on purpose."""
    tags = experiment.tags or {}
    kind = tags.get(EXPERIMENT_KIND_TAG, "")
    missing = {k: v for k, v in experiment_tags().items() if tags.get(k) != v and k != EXPERIMENT_KIND_TAG}
    if not kind or kind.endswith("_inferred") or kind == "no_inferred_type":
        missing[EXPERIMENT_KIND_TAG] = TRAINING_KIND
    for key, value in missing.items():
        client.set_experiment_tag(experiment.experiment_id, key, value)


def unique_run_name(client: Any, experiment_id: str, name: str) -> str:
    """``name``, or ``name #2``, ``#3``... when runs of the experiment already carry it."""
    prefix = name.split("'")[0].split("\\")[0]
    taken = {r.info.run_name for r in client.search_runs([experiment_id], f"attributes.run_name LIKE '{prefix}%'",
                                                         max_results=1000)}
    if name not in taken:
        return name
    return next(f"{name} #{i}" for i in range(2, len(taken) + 3) if f"{name} #{i}" not in taken)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    """``params`` on the run, in MLflow's batches of 100."""
    from mlflow.entities import Param  # lazy: mlflow, as in connect

    for chunk in _chunks([Param(k, v) for k, v in params.items()], 100):
        client.log_batch(run_id, params=chunk)


def log_metrics(client: Any, run_id: str, metrics: dict[str, float], time_ms: int, step: int = 0) -> None:
    """``metrics`` on the run at ``time_ms`` (epoch milliseconds) and ``step``, in MLflow's batches of 1000."""
    from mlflow.entities import Metric  # lazy: mlflow, as in connect

    for chunk in _chunks([Metric(k, v, time_ms, step) for k, v in metrics.items()], 1000):
        client.log_batch(run_id, metrics=chunk)


class Replayer:
    """Applies logging records to one store; ``folder()`` is the results folder artifacts are read from."""

    def __init__(self, folder: Callable[[], Path], *, http_timeout_s: float = 10.0, http_retries: int = 2,
                 dedupe: bool = False):
        self.folder = folder
        self.http = {"http_timeout_s": http_timeout_s, "http_retries": http_retries}
        self.dedupe = dedupe  # replaying a journal: a child run may exist already (records are at-least-once)
        self.client: Any = None
        self.experiment_id: Optional[str] = None
        self.target: Optional[dict] = None
        self.ids: dict[str, str] = {}

    def apply(self, record: dict) -> None:
        op = record["op"]
        if op == "target":
            self._target(record)
        elif op == "bind":
            self.ids[record["key"]] = record["run_id"]
        elif self.client is None:
            raise ConnectionError("no tracking store connected")
        else:
            for attempt in range(3):  # SQLite under concurrent writers: 'database is locked' passes
                try:
                    return getattr(self, f"_{op}")(record)
                except Exception as err:  # noqa: BLE001 - classified below
                    if getattr(err, "error_code", None) != "TEMPORARILY_UNAVAILABLE" or attempt == 2:
                        raise
                    time.sleep(0.5 * (attempt + 1))

    def _run_id(self, record: dict) -> str:
        try:
            return self.ids[record["key"]]
        except KeyError:
            raise SkipRecord(f"no run was opened for {record['key']!r}") from None

    def _target(self, record: dict) -> None:
        target = {"op": "target", "uri": record["uri"], "experiment": record["experiment"]}
        if self.target == target and self.client is not None:
            return
        self.client, self.experiment_id = connect(record["uri"], record["experiment"], **self.http)
        self.target = target
        self.ids["experiment"] = self.experiment_id  # reported like a run id (the run's link needs it)

    def _open_parent(self, record: dict) -> None:
        previous = self.ids.get("parent") or record.get("run_id")
        if previous and self._alive(previous):
            if record.get("run_id") == previous:  # a resume: the interrupted attempt's open node runs end KILLED
                self._end_orphans(previous)
            self.client.update_run(previous, status="RUNNING")
            self._tags({"key": "parent", "tags": record["tags"]}, run_id=previous)
            self.ids["parent"] = previous
            return
        name = unique_run_name(self.client, self.experiment_id, record["name"])
        run = self.client.create_run(self.experiment_id, start_time=record.get("time"), tags=record["tags"],
                                     run_name=name)
        self.ids["parent"] = run.info.run_id

    def _end_orphans(self, parent_id: str) -> None:
        orphans = self.client.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}' "
                                                                 f"and attributes.status = 'RUNNING'")
        for child in orphans:
            self.client.set_tag(child.info.run_id, "fedcore.status", "killed")
            self.client.set_terminated(child.info.run_id, status="KILLED")

    def _open_child(self, record: dict) -> None:
        tags = {**record["tags"], "mlflow.parentRunId": self._run_id({"key": "parent"}), "fedcore.key": record["key"]}
        if self.dedupe:
            found = self.client.search_runs([self.experiment_id], f"tags.`fedcore.key` = '{record['key']}'")
            if found:
                self.ids[record["key"]] = found[0].info.run_id
                return
        run = self.client.create_run(self.experiment_id, start_time=record.get("time"), tags=tags,
                                     run_name=record["name"])
        self.ids[record["key"]] = run.info.run_id

    def _alive(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception as err:  # noqa: BLE001
            if getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    def _params(self, record: dict) -> None:
        run_id = self._run_id(record)
        logged = self.client.get_run(run_id).data.params  # params are write-once: a resume logs only new keys
        log_params(self.client, run_id, {k: v for k, v in record["params"].items() if k not in logged})

    def _metrics(self, record: dict) -> None:
        log_metrics(self.client, self._run_id(record), record["metrics"], record["time"], int(record.get("step") or 0))

    def _tags(self, record: dict, run_id: Optional[str] = None) -> None:
        from mlflow.entities import RunTag  # lazy: mlflow, as in connect

        tags = [RunTag(k, str(v)) for k, v in record["tags"].items()]
        for chunk in _chunks(tags, 100):
            self.client.log_batch(run_id or self._run_id(record), tags=chunk)

    def _artifacts(self, record: dict) -> None:
        """Files of ``src`` (a file or a folder, relative to the results folder), minus ``exclude``."""
        run_id = self._run_id(record)
        src = self.folder() / record["src"]
        if not src.exists():
            raise SkipRecord(f"{src} is gone")
        files = [src] if src.is_file() else sorted(
            p for p in src.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name not in record.get("exclude", ()))
        for path in files:
            self.client.log_artifact(run_id, str(path), record.get("dest"))

    def _text(self, record: dict) -> None:
        run_id = self._run_id(record)
        self.client.log_text(run_id, record["text"].replace("<run_id>", run_id), record["file"])

    def _plot(self, record: dict) -> None:
        path = self.folder() / "metrics.json"
        rows = json.loads(path.read_text()) if path.exists() else []
        if not rows:
            raise SkipRecord("no metrics.json to plot")
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_nodes(rows, Path(tmp) / record["file"], title=record.get("title", ""))
            self.client.log_artifact(self._run_id(record), str(path))

    def _close(self, record: dict) -> None:
        run_id = self._run_id(record)
        self.client.set_tag(run_id, "fedcore.status", record["status"])
        self.client.set_terminated(run_id, STATUS.get(record["status"], "FINISHED"), end_time=record.get("time"))


def load_logged_model(run_id: str, base_model: Any, tracking_uri: Optional[str] = None,
                      artifact_path: str = "model") -> Any:
    """The final model logged by a tracking run, rebuilt on a freshly built original ``base_model``.

    Downloads the run's ``model/`` artifact (``state.pt`` + ``manifest.json``, the project's
    checkpoint format) and replays it with :func:`fedcore_adapter.checkpoint.load_model`.
    """
    from mlflow.artifacts import download_artifacts  # lazy: mlflow, as in connect

    from ..checkpoint import load_model  # lazy: torch; the logger process imports this module without it

    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp,
                                   tracking_uri=resolve_uri(tracking_uri))
        return load_model(local, base_model)


def _all_runs(client: Any, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _counts_as_int(row: dict) -> dict:
    """MLflow stores every metric as a float; counts are integers again."""
    return {k: int(v) if k in COUNT_METRICS and isinstance(v, float) and v.is_integer() else v for k, v in row.items()}


def fetch_runs(tracking_uri: Optional[str] = None, experiment: Optional[str] = None) -> list[dict]:
    """Setup runs of a store as plain summaries ``{run_id, run_name, setup, status, rows}``.

    ``rows`` rebuilds the metrics table: row 0 from the parent's ``input_*`` metrics, one row per
    node from its child run (the latest finished attempt of each node).
    """
    uri = resolve_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise ConfigError(f"no tracking store at {uri} (run a tracked setup first, or pass --tracking-uri)")
    client, _ = connect(uri)
    if experiment:
        found = client.get_experiment_by_name(experiment)
        ids = [found.experiment_id] if found is not None else []
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    parents = _all_runs(client, ids, "tags.`fedcore.role` = 'setup'")
    children: dict[str, list] = {}
    for child in _all_runs(client, ids, "tags.`fedcore.role` = 'node'"):
        children.setdefault(child.data.tags.get("mlflow.parentRunId"), []).append(child)
    summaries = []
    for parent in sorted(parents, key=lambda r: r.info.start_time or 0):
        tags = parent.data.tags
        input_row = {"node_index": 0, "node": "input", "kind": "input",
                     **{k[len("input_"):]: v for k, v in parent.data.metrics.items() if k.startswith("input_")},
                     **{k: tags[f"fedcore.input_{k}"] for k in TEXT_COLUMNS if f"fedcore.input_{k}" in tags}}
        nodes: dict[int, Any] = {}
        for child in sorted(children.get(parent.info.run_id, []), key=lambda r: r.info.start_time or 0):
            index = int(child.data.tags.get("fedcore.node_index", -1))
            if child.info.status == "FINISHED" or index not in nodes:
                nodes[index] = child
        rows = [_counts_as_int(r) for r in [input_row] + [
            {"node_index": i + 1, "node": c.data.tags.get("fedcore.node", ""),
             "kind": c.data.tags.get("fedcore.node_kind", ""), **c.data.metrics,
             **{k: c.data.tags[f"fedcore.{k}"] for k in TEXT_COLUMNS if f"fedcore.{k}" in c.data.tags}}
            for i, c in sorted(nodes.items())]]
        summaries.append({"source": f"{client.tracking_uri}#{parent.info.run_id}", "run_id": parent.info.run_id,
                          "run_name": parent.info.run_name, "setup": tags.get("fedcore.setup", ""),
                          "status": tags.get("fedcore.status", parent.info.status.lower()), "rows": rows})
    return summaries
