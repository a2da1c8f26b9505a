"""The training process's end of the logger process: send records, never wait on the store.

One logger process (``worker.py``) serves every tracked run of a training process, so
mlflow's imports are paid once per process, off the training thread. Records go out
through a writer thread, so a slow or dead store never blocks training. The logger
acknowledges each record once applied or journaled; whatever it has not acknowledged
when a run ends (it crashed, or did not finish within the flush timeout) is journaled
here, so nothing is lost.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from .journal import PENDING_FILE, append_pending_live, live_folder, offline_message, with_head

_EOF = object()


class _Connection:
    """The logger process of this training process, with a writer and a reader thread."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.sessions: dict[str, "LoggerSession"] = {}
        self.alive = True
        self.warm = threading.Event()  # the logger's start-up imports are done (or it died)
        self._outbox: "queue.Queue" = queue.Queue()
        root = str(Path(__file__).resolve().parents[2])  # the folder holding fedcore_adapter
        env = {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", **os.environ,
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "fedcore_adapter.tracking.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        threading.Thread(target=self._write, name="fedcore-tracking-writer", daemon=True).start()
        threading.Thread(target=self._read, name="fedcore-tracking-reader", daemon=True).start()

    def send(self, message: dict) -> None:
        self._outbox.put(message)

    def _write(self) -> None:
        while True:
            item = self._outbox.get()
            if item is _EOF:
                break
            try:
                self.proc.stdin.write(json.dumps(item, default=str) + "\n")
                self.proc.stdin.flush()
            except (OSError, ValueError):  # the logger died: the records stay unacknowledged
                self._died()
                return

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("warm"):
                self.warm.set()
                continue
            session = self.sessions.get(message.get("sid"))
            if session is not None:
                session.on_message(message)
        self._died()

    def _died(self) -> None:
        self.alive = False
        self.warm.set()
        for session in list(self.sessions.values()):
            session.closed.set()
            session.wake()


_CONNECTION: Optional[_Connection] = None
_CONNECTION_LOCK = threading.Lock()


def _connection() -> Optional[_Connection]:
    """The logger process, started on first use (and again after a fork or a crash)."""
    global _CONNECTION
    with _CONNECTION_LOCK:
        if _CONNECTION is None or not _CONNECTION.alive or _CONNECTION.pid != os.getpid():
            try:
                _CONNECTION = _Connection()
            except OSError:
                _CONNECTION = None
        return _CONNECTION


class LoggerSession:
    """One run's records on their way to the logger process; ``ids`` are the runs it opened."""

    def __init__(self, folder: Path, target: dict, warn: Callable[[str], None], *, http_timeout_s: float,
                 http_retries: int):
        self.sid = uuid.uuid4().hex
        self.folder = Path(folder)
        self.target = target
        self.warn = warn
        self.ids: dict[str, str] = {}
        self.warned = False
        self.closed = threading.Event()
        self._seq = 0
        self._unacked: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified on each acknowledgement and when the logger dies
        self._conn = _connection()
        if self._conn is None:
            self.closed.set()
            return
        self._conn.sessions[self.sid] = self
        self._conn.send({"open": self.sid, "folder": str(self.folder), "target": target,
                         "http_timeout_s": http_timeout_s, "http_retries": http_retries})

    @property
    def pending_path(self) -> Path:
        return live_folder(self.folder) / PENDING_FILE

    def submit(self, record: dict) -> None:
        with self._lock:
            self._seq += 1
            record = {**record, "sid": self.sid, "seq": self._seq}
            self._unacked[self._seq] = record
        if self._conn is not None:
            self._conn.send(record)

    def settle(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until the logger has finished its start-up imports and applied (or
        journaled) every record sent so far; True when it has. Its start-up takes a core for seconds (mlflow,
        the store's schema, matplotlib): a latency measured beside it is not the model's."""
        conn = self._conn
        if conn is None:
            return True
        deadline = time.monotonic() + timeout_s
        if not conn.warm.wait(timeout_s):  # set when the imports are done, and when the logger dies
            return False
        with self._changed:
            return self._changed.wait_for(lambda: not self._unacked or not conn.alive,
                                          max(0.0, deadline - time.monotonic()))

    def wake(self) -> None:
        """Wake :meth:`settle` (the logger died)."""
        with self._changed:
            self._changed.notify_all()

    def move_folder(self, folder: Path) -> None:
        """The results folder was renamed (``.partial`` -> final)."""
        self.folder = Path(folder)
        self.submit({"op": "folder", "path": str(self.folder)})

    def close(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) for the logger to finish this run; journal what it did not acknowledge.

        Returns True when nothing is left pending.
        """
        if self._conn is not None:
            self._conn.send({"close": self.sid})
        finished = self.closed.wait(timeout_s)
        if self._conn is not None:
            self._conn.sessions.pop(self.sid, None)
        with self._lock:
            left = [{k: v for k, v in r.items() if k != "sid"} for r in self._unacked.values() if r["op"] != "folder"]
            self._unacked.clear()
        if left:
            reason = TimeoutError(f"logging did not finish within {timeout_s:g} s") if not finished \
                else ConnectionError("the logger process stopped")
            self._warn_once(offline_message(self.target["uri"], reason, self.pending_path))
            append_pending_live(self.folder,
                                left if self.pending_path.exists() else with_head(self.target, self.ids, left))
        return not self.pending_path.exists()

    def on_message(self, message: dict) -> None:
        """Called from the reader thread."""
        if "ack" in message:
            with self._changed:
                self._unacked.pop(message["ack"], None)
                self._changed.notify_all()
        elif "bind" in message:
            self.ids[message["bind"]] = message["run_id"]
        elif "warn" in message:
            self._warn_once(message["warn"])
        elif "closed" in message:
            self.closed.set()

    def _warn_once(self, text: str) -> None:
        if not self.warned:
            self.warned = True
            self.warn(text)
