"""Where a run writes, and who owns that folder.

A run of setup ``S`` on model ``m`` is named ``S_m``; when that name is taken (a finished folder, or a
live run's ``.partial``) it is ``S_m-2``, then ``S_m-3`` ...: a finished folder is never replaced and a
live run's folder is never touched. A run claims ``<name>.partial`` under a lock on the output folder
and records its owner in ``run.json`` (``pid``, ``host``, ``started_at``, ``heartbeat_at``, refreshed
while it runs). An unfinished folder whose owner is gone (its process dead on this host, or its heartbeat
older than ``STALE_AFTER_S`` elsewhere) is stale: ``resume=true`` continues it, a new run discards it.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import socket
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import ConfigError
from .results import PARTIAL_SUFFIX, read_json, write_json

log = logging.getLogger("fedcore_adapter")
LOCK_FILE = ".fedcore-placement.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0
# Set by a task runner that may run the same run again after losing it (a Dask worker's death): the run's
# ``token`` is stored in run.json so that the next ``attempt`` finds and continues the unfinished folder.
RUN_ATTEMPT: ContextVar[Optional[dict]] = ContextVar("fedcore_run_attempt", default=None)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def numbered(base: str, n: int) -> str:
    return base if n == 1 else f"{base}-{n}"


def _process_start(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - psutil missing or process gone
        return None


def owner_fields() -> dict:
    """This process as a folder's owner (``pid_started`` tells a reused pid from the owner)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_started": _process_start(os.getpid()),
            "heartbeat_at": now_iso()}


def _pid_alive(pid: int, started: Optional[float]) -> bool:
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 1.0
    except ImportError:  # pragma: no cover - psutil ships with distributed
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    except Exception:  # noqa: BLE001 - NoSuchProcess, AccessDenied...
        return False


def live_owner(run_json: dict) -> Optional[str]:
    """``"pid 123 on host h, started ..., heartbeat 4 s ago"`` when a live process owns the folder, else None."""
    if run_json.get("status") != "running" or not run_json.get("pid"):
        return None
    beat = run_json.get("heartbeat_at") or run_json.get("started_at")
    try:
        age = time.time() - datetime.fromisoformat(beat).timestamp()
    except (TypeError, ValueError):
        age = float("inf")
    if run_json.get("host") == socket.gethostname():
        alive = _pid_alive(int(run_json["pid"]), run_json.get("pid_started"))
    else:
        alive = age < STALE_AFTER_S
    if not alive:
        return None
    return (f"pid {run_json['pid']} on host {run_json.get('host')}, started {run_json.get('started_at')}, "
            f"heartbeat {age:.0f} s ago")


@contextlib.contextmanager
def folder_lock(root: Path) -> Iterator[None]:
    """Exclusive, short: placement decisions in ``root`` are made by one process at a time."""
    fd = os.open(root / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class Placement:
    """Where a run writes: ``partial`` while it runs, ``final`` once complete (unless taken by then)."""

    final: Path
    partial: Path
    resume: bool = False        # ``partial`` holds an unfinished run to continue
    completed: Optional[Path] = None  # resume=true found nothing unfinished: the latest finished folder


def _numbers(root: Path, base: str) -> dict[int, dict[str, Path]]:
    """Existing folders named ``base`` / ``base-N`` (finished and ``.partial``) by their number."""
    pattern = re.compile(rf"^{re.escape(base)}(?:-(\d+))?({re.escape(PARTIAL_SUFFIX)})?$")
    found: dict[int, dict[str, Path]] = {}
    for path in root.iterdir() if root.is_dir() else ():
        m = pattern.match(path.name)
        if m and path.is_dir() and (m.group(1) is None or int(m.group(1)) >= 2):
            found.setdefault(int(m.group(1) or 1), {})["partial" if m.group(2) else "final"] = path
    return found


def _make_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".{LOCK_FILE}.probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"output_dir = {str(root)!r}: cannot create or write the results folder there ({reason}); "
                          f"choose a writable folder, e.g. output_dir=/tmp/composition_results") from None


def _claim(partial: Path, run_json: dict) -> None:
    (partial / "nodes").mkdir(parents=True)
    write_json(partial / "run.json", run_json)


def place(root: Path | str, base: str, *, resume: bool, setup_hash: str) -> Placement:
    """Choose and claim the folder of a new (or resumed) run named ``base`` in ``root``; see the module doc.

    The claimed ``.partial`` holds a ``run.json`` naming this process as its owner when this returns.
    """
    root = Path(root)
    _make_root(root)
    attempt = RUN_ATTEMPT.get()
    with folder_lock(root):
        found = _numbers(root, base)
        runs = {n: read_json(f["partial"] / "run.json", {}) or {} for n, f in found.items() if "partial" in f}
        stale = {n: rj for n, rj in runs.items() if live_owner(rj) is None}
        if attempt and attempt.get("token"):
            mine = [n for n, rj in stale.items() if rj.get("token") == attempt["token"] and rj.get("setup_hash")]
            if mine:
                n = max(mine)
                log.warning("%s: this run's previous attempt was lost with its worker; resuming it",
                            found[n]["partial"])
                return _take_over(root, base, n, found[n]["partial"], runs[n])
            if attempt.get("attempt", 1) > 1:
                log.warning("%s: this run's previous attempt was lost with its worker and its results folder is not "
                            "visible here (output_dir is not shared); it restarts from the first node", root / base)
        if resume:
            candidates = [n for n, rj in stale.items() if rj.get("setup_hash")]
            matching = [n for n in candidates if runs[n]["setup_hash"] == setup_hash]
            if matching or candidates:
                n = max(matching or candidates)
                return _take_over(root, base, n, found[n]["partial"], runs[n])
            live = {n: live_owner(rj) for n, rj in runs.items() if n not in stale}
            if live:
                n = max(live)
                raise ConfigError(f"cannot resume {found[n]['partial']}: a live run owns it ({live[n]}); wait for it "
                                  f"to finish, or start another run without resume=true (it is placed beside it)")
            finished = [n for n, f in found.items() if "final" in f]
            if finished:
                n = max(finished)
                return Placement(found[n]["final"], found[n]["final"], completed=found[n]["final"])
            if not stale:  # (an unrecorded stale folder is named below, as it is discarded)
                log.warning("resume=true: nothing to resume under %s (no unfinished or finished %s run there); "
                            "starting a new run", root, base)
        n = 1
        while True:
            folders = found.get(n, {})
            if "final" not in folders and ("partial" not in folders or n in stale):
                break
            n += 1
        final = root / numbered(base, n)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if partial.exists():
            if resume:  # only an unrecorded one is left here: there is nothing in it to continue
                log.warning("resume=true: nothing to resume in %s (it stopped before recording anything); starting "
                            "a new run", partial)
            else:
                what = "" if runs.get(n, {}).get("setup_hash") else " (it stopped before recording anything)"
                log.warning("discarding the unfinished run in %s%s; its owner is gone (pass resume=true to continue "
                            "it)", partial, what)
            shutil.rmtree(partial)
        _claim(partial, {"status": "running", "run_name": final.name, "setup_hash": setup_hash,
                         "started_at": now_iso(), **owner_fields(), **_attempt_fields(attempt)})
        return Placement(final, partial)


def _attempt_fields(attempt: Optional[dict]) -> dict:
    return {"token": attempt.get("token"), "attempt": attempt.get("attempt", 1)} if attempt else {}


def _take_over(root: Path, base: str, n: int, partial: Path, run_json: dict) -> Placement:
    """Make this process the owner of the stale unfinished run in ``partial``."""
    attempt = RUN_ATTEMPT.get()
    write_json(partial / "run.json", {**run_json, "status": "running", "previous_status": run_json.get("status"),
                                      **owner_fields(), **_attempt_fields(attempt)})
    return Placement(root / numbered(base, n), partial, resume=True)


def finish(partial: Path, final: Path) -> Path:
    """Rename the completed ``partial`` to ``final``, or to the next free number when ``final`` was taken."""
    root = partial.parent
    with folder_lock(root):
        target = final
        if target.exists():
            base, _, number = final.name.rpartition("-")
            base, n = (base, int(number)) if number.isdigit() and base else (final.name, 1)
            while (root / numbered(base, n)).exists() or (root / (numbered(base, n) + PARTIAL_SUFFIX)).exists():
                n += 1
            target = root / numbered(base, n)
        os.replace(partial, target)
    return target


class Heartbeat:
    """Calls ``beat()`` every ``interval`` seconds in a daemon thread until stopped."""

    def __init__(self, beat: Callable[[], None], interval: Optional[float] = None):
        self.beat, self.interval = beat, interval or HEARTBEAT_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedcore-heartbeat", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as err:  # noqa: BLE001 - a missed beat only makes the folder look stale sooner
                log.debug("heartbeat failed: %s", err)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
