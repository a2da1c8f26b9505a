"""Fan whole runs out as Dask tasks: one task per run, progress as they finish, every outcome kept.

A task that fails for its own reason (a bad override...) is an outcome with its one-line error, never
an exception that stops the others. A worker process that dies mid-task is Dask's business: the
scheduler gives the task to another worker (up to ``cluster.allowed_failures`` deaths), and the run
resumes there from its last finished node when the results folder is shared. A cluster left with no live
worker for ``cluster.no_worker_timeout`` seconds fails the unfinished runs with one line saying so.
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
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Optional, Sequence

from distributed import Client, get_client, get_worker, wait

from ..errors import error_line
from ..placement import RUN_ATTEMPT

log = logging.getLogger("fedcore_adapter.distributed")
_RUN_LOCK = threading.Lock()  # one whole run at a time per worker process (global RNG, cwd, Hydra state)
ATTEMPTS = "fedcore-attempts"  # scheduler metadata: task key -> attempts started
NO_WORKER_TIMEOUT_S = 120.0
POLL_S = 2.0


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


def _attempt() -> Optional[dict]:
    """This task's key and how many times it has started (the scheduler reruns a task whose worker died)."""
    try:
        key = get_worker().get_current_task()
        client = get_client()
        n = int(client.get_metadata([ATTEMPTS, str(key)], default=0)) + 1
        client.set_metadata([ATTEMPTS, str(key)], n)
    except Exception:  # noqa: BLE001 - outside a worker, or the scheduler unreachable: a first attempt
        return None
    return {"token": str(key), "attempt": n}


def run_task(fn: Callable[[Any], Any], payload: Any, cwd: Optional[str]) -> dict:
    """Worker side of every fanned-out run: never raises, reports its error in one line.

    The run knows its task's attempt (``placement.RUN_ATTEMPT``): a run whose worker died is resumed
    from its last finished node by the next attempt when the results folder is shared."""
    start = time.perf_counter()
    try:
        worker = get_worker().address
    except ValueError:
        worker = None
    attempt = RUN_ATTEMPT.set(_attempt())
    with exclusive_run(cwd):
        tail, saved = _TailWriter(sys.stderr), sys.stderr
        sys.stderr = tail
        try:
            value, status, error = fn(payload), "completed", None
        except SystemExit as err:  # a CLI-style task exiting must not take the worker down
            value, status = None, "failed"
            error = tail.last.removeprefix("error: ") or f"exited with status {err.code}"
        except Exception as err:  # noqa: BLE001 - the error is the outcome
            value, status, error = None, "failed", error_line(err)
        finally:
            sys.stderr = saved
            RUN_ATTEMPT.reset(attempt)
    return {"status": status, "value": value, "error": error, "worker": worker, "wall_s": time.perf_counter() - start}


class Progress:
    """Logs tasks done / running / queued / failed as they change, and every ``heartbeat_s`` otherwise.

    ``running``: submitted tasks a worker is processing; ``queued``: the rest of the unfinished ones
    (not yet submitted, or waiting on the scheduler, e.g. for a worker to come back)."""

    def __init__(self, client: Client, total: int):
        self.client, self.total = client, total
        self.in_flight: dict[str, Any] = {}
        self.done = self.failed = 0

    def counts(self) -> str:
        try:
            processing = {k for keys in self.client.processing().values() for k in keys}
        except Exception:  # noqa: BLE001 - progress must never fail the sweep
            processing = set()
        running = len(set(self.in_flight) & processing)
        finished = self.done + self.failed
        return (f"{finished}/{self.total} finished: {self.done} done, {self.failed} failed, "
                f"{running} running, {self.total - finished - running} queued")

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
        return TaskResult(index, label, "failed", error=error_line(err))
    result = TaskResult(index, label, out["status"], out["value"], out["error"], out["worker"], out["wall_s"])
    if result.status == "completed" and error_of is not None:
        error = error_of(result.value)
        if error:
            result.status, result.error = "failed", error
    return result


def run_slots(client: Client) -> int:
    """How many runs the cluster takes at once: one per worker process (a run holds its worker's run lock)."""
    try:
        return max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    except Exception:  # noqa: BLE001 - keep one run queued on the scheduler while workers come and go
        return 1


class _WorkerWatch:
    """Notices a cluster left with no live worker; after ``timeout`` seconds of that, says so in one line."""

    def __init__(self, client: Client, timeout: float):
        self.client, self.timeout = client, timeout
        self.since: Optional[float] = None

    def check(self) -> Optional[str]:
        try:
            alive = len(self.client.scheduler_info(n_workers=-1).get("workers", {}))
        except Exception:  # noqa: BLE001 - the scheduler itself unreachable counts as no worker
            alive = 0
        if alive:
            self.since = None
            return None
        if self.since is None:
            self.since = time.monotonic()
            log.warning("no live Dask worker; waiting up to %g s for one (cluster.no_worker_timeout)", self.timeout)
        if time.monotonic() - self.since < self.timeout:
            return None
        address = getattr(self.client.scheduler, "address", "the scheduler")
        return (f"no live Dask worker for {self.timeout:g} s, so the unfinished runs failed; start workers with "
                f"`dask worker {address}` and run them again (finished runs keep their results)")


def run_tasks(client: Client, fn: Callable[[Any], Any], payloads: Sequence[Any], labels: Sequence[str], *,
              indices: Optional[Sequence[int]] = None, cwd: Optional[str] = None, heartbeat_s: float = 30.0,
              error_of: Optional[Callable[[Any], Optional[str]]] = None,
              order: Optional[Sequence[int]] = None) -> list[TaskResult]:
    """Run ``fn(payload)`` for every payload as one task each; results in input order, failures included.

    ``indices`` number the tasks in logs and results (default 0..n-1); ``cwd`` is where tasks run
    when that folder exists on their worker; ``error_of(value)`` tells a returned value that reports
    a failure (e.g. a Hydra JobReturn with status FAILED). Tasks are handed to the scheduler in ``order``
    (positions in ``payloads``; default: as given), no more at a time than there are workers, so each
    starts on the first worker to free up and the workers finish together (given longest first).
    """
    if not payloads:
        return []
    numbers = list(indices) if indices is not None else list(range(len(payloads)))
    order = list(order) if order is not None else list(range(len(payloads)))
    if sorted(order) != list(range(len(payloads))):
        raise ValueError(f"order must be a permutation of 0..{len(payloads) - 1} (got {order})")
    tag = uuid.uuid4().hex[:8]
    waiting = deque(order)
    position: dict[str, int] = {}
    progress = Progress(client, len(payloads))
    results: list[Optional[TaskResult]] = [None] * len(payloads)

    def top_up() -> None:
        slots = run_slots(client)
        while waiting and len(progress.in_flight) < slots:
            i = waiting.popleft()
            future = client.submit(run_task, fn, payloads[i], cwd, key=f"fedcore-run-{numbers[i]}-{tag}", pure=False)
            progress.in_flight[future.key], position[future.key] = future, i

    no_worker_timeout = float(getattr(client, "fedcore_no_worker_timeout", NO_WORKER_TIMEOUT_S))
    watch = _WorkerWatch(client, no_worker_timeout)
    last_beat = time.monotonic()
    try:
        top_up()
        log.info("submitted %d run(s): %s", len(payloads), progress.counts())
        while progress.in_flight:
            try:
                with client.as_current():
                    finished = wait(list(progress.in_flight.values()), timeout=min(heartbeat_s, POLL_S),
                                    return_when="FIRST_COMPLETED").done
            except TimeoutError:
                lost = watch.check()
                if lost:
                    log.error("%s", lost)
                    for future in list(progress.in_flight.values()) + [None] * len(waiting):
                        i = position[future.key] if future is not None else waiting.popleft()
                        results[i] = TaskResult(numbers[i], labels[i], "failed", error=lost)
                        progress.failed += 1
                    client.cancel(list(progress.in_flight.values()))
                    progress.in_flight.clear()
                    break
                if time.monotonic() - last_beat >= heartbeat_s:
                    last_beat = time.monotonic()
                    log.info("[%s] still working", progress.counts())
                continue
            for future in sorted(finished, key=lambda f: position[f.key]):
                i = position[future.key]
                del progress.in_flight[future.key]
                results[i] = _result(numbers[i], labels[i], future, error_of)
                top_up()
                progress.finished(results[i])
    finally:
        client.cancel(list(progress.in_flight.values()))
    return [r for r in results if r is not None]
