"""Fan whole runs out as Dask tasks: one task per run, progress as they finish, every outcome kept.

A task that fails for its own reason (a bad override...) is an outcome with its one-line error, never
an exception that stops the others. A worker process that dies mid-task is Dask's business: the
scheduler gives the task to another worker (up to ``cluster.allowed_failures`` deaths).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Optional, Sequence

from distributed import Client, get_worker, wait

from ..errors import FedcoreError

log = logging.getLogger("fedcore_adapter.distributed")
_RUN_LOCK = threading.Lock()  # one whole run at a time per worker process (global RNG, cwd, Hydra state)


@dataclass
class TaskResult:
    """What came back for one task: status ``completed`` or ``failed``, its value or its error."""

    index: int
    label: str
    status: str
    value: Any = None
    error: Optional[str] = None
    worker: Optional[str] = None
    wall_s: Optional[float] = None

    def record(self) -> dict:
        """Everything but the value (JSON-ready)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "value"}


def one_line(err: BaseException) -> str:
    """An error as the one line a user sees (FedcoreError messages are already complete)."""
    text = " ".join(str(err).split())
    if isinstance(err, FedcoreError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _TailWriter(io.TextIOBase):
    """Writes through to a stream and remembers the last line (the message of a ``sys.exit``)."""

    def __init__(self, stream: Any):
        self.stream, self.last = stream, ""

    def write(self, text: str) -> int:
        lines = [line for line in text.splitlines() if line.strip()]
        if lines:
            self.last = lines[-1].strip()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def exclusive_run(cwd: Optional[str]) -> Iterator[None]:
    """Hold this process's run lock, in ``cwd`` (the submitter's folder) when it exists here."""
    with _RUN_LOCK:
        before = os.getcwd()
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)
        try:
            yield
        finally:
            os.chdir(before)


def run_task(fn: Callable[[Any], Any], payload: Any, cwd: Optional[str]) -> dict:
    """Worker side of every fanned-out run: never raises, reports its error in one line."""
    start = time.perf_counter()
    try:
        worker = get_worker().address
    except ValueError:
        worker = None
    with exclusive_run(cwd):
        tail, saved = _TailWriter(sys.stderr), sys.stderr
        sys.stderr = tail
        try:
            value, status, error = fn(payload), "completed", None
        except SystemExit as err:  # a CLI-style task exiting must not take the worker down
            value, status = None, "failed"
            error = tail.last.removeprefix("error: ") or f"exited with status {err.code}"
        except Exception as err:  # noqa: BLE001 - the error is the outcome
            value, status, error = None, "failed", one_line(err)
        finally:
            sys.stderr = saved
    return {"status": status, "value": value, "error": error, "worker": worker, "wall_s": time.perf_counter() - start}


class Progress:
    """Logs tasks done / running / queued / failed as they change, and every ``heartbeat_s`` otherwise."""

    def __init__(self, client: Client, futures: Sequence[Any], labels: Sequence[str]):
        self.client, self.futures, self.labels = client, list(futures), list(labels)
        self.done = self.failed = 0

    def counts(self) -> str:
        pending = {f.key for f in self.futures if not f.done()}
        try:
            processing = {k for keys in self.client.processing().values() for k in keys}
        except Exception:  # noqa: BLE001 - progress must never fail the sweep
            processing = set()
        running = len(pending & processing)
        total = len(self.futures)
        return (f"{self.done + self.failed}/{total} finished: {self.done} done, {self.failed} failed, "
                f"{running} running, {len(pending) - running} queued")

    def finished(self, result: TaskResult) -> None:
        if result.status == "completed":
            self.done += 1
            what = f"done in {result.wall_s:.1f}s" if result.wall_s is not None else "done"
        else:
            self.failed += 1
            what = f"FAILED: {result.error}"
        log.info("[%s] #%d %s: %s", self.counts(), result.index, result.label, what)


def _result(index: int, label: str, future: Any, error_of: Optional[Callable[[Any], Optional[str]]]) -> TaskResult:
    try:
        out = future.result()
    except Exception as err:  # noqa: BLE001 - e.g. KilledWorker after too many worker deaths
        return TaskResult(index, label, "failed", error=one_line(err))
    result = TaskResult(index, label, out["status"], out["value"], out["error"], out["worker"], out["wall_s"])
    if result.status == "completed" and error_of is not None:
        error = error_of(result.value)
        if error:
            result.status, result.error = "failed", error
    return result


def run_tasks(client: Client, fn: Callable[[Any], Any], payloads: Sequence[Any], labels: Sequence[str], *,
              indices: Optional[Sequence[int]] = None, cwd: Optional[str] = None, heartbeat_s: float = 30.0,
              error_of: Optional[Callable[[Any], Optional[str]]] = None) -> list[TaskResult]:
    """Run ``fn(payload)`` for every payload as one task each; results in input order, failures included.

    ``indices`` number the tasks in logs and results (default 0..n-1); ``cwd`` is where tasks run
    when that folder exists on their worker; ``error_of(value)`` tells a returned value that reports
    a failure (e.g. a Hydra JobReturn with status FAILED).
    """
    if not payloads:
        return []
    numbers = list(indices) if indices is not None else list(range(len(payloads)))
    tag = uuid.uuid4().hex[:8]
    futures = [client.submit(run_task, fn, p, cwd, key=f"fedcore-run-{n}-{tag}", pure=False)
               for n, p in zip(numbers, payloads)]
    progress = Progress(client, futures, labels)
    log.info("submitted %d run(s): %s", len(futures), progress.counts())
    index_of = {f.key: i for i, f in enumerate(futures)}
    results: list[Optional[TaskResult]] = [None] * len(futures)
    remaining = set(futures)
    try:
        while remaining:
            try:
                with client.as_current():
                    finished = wait(list(remaining), timeout=heartbeat_s, return_when="FIRST_COMPLETED").done
            except TimeoutError:
                log.info("[%s] still working", progress.counts())
                continue
            for future in sorted(finished, key=lambda f: index_of[f.key]):
                i = index_of[future.key]
                results[i] = _result(numbers[i], labels[i], future, error_of)
                remaining.discard(future)
                progress.finished(results[i])
    finally:
        client.cancel(list(remaining))
    return [r for r in results if r is not None]
