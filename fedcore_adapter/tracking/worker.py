"""The logger process: applies the records runs send on stdin, answers on stdout.

One per training process (see :mod:`.channel`); it keeps mlflow and its seconds of
imports out of the training process and serves its runs one session each. Protocol,
one JSON object per line:

- in: ``{"open": sid, "folder", "target", "http_timeout_s", "http_retries"}``; records
  ``{"sid", "seq", "op", ...}`` (``op = "folder"`` moves the results folder); ``{"close": sid}``;
- out: ``{"sid", "bind": key, "run_id"}`` when a run is opened, ``{"sid", "warn": text}``,
  ``{"sid", "ack": seq}`` once a record is applied or journaled, ``{"sid", "closed": true, "pending": bool}``.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from ..plots import pyplot
from .journal import Applier, live_folder
from .store import Replayer


def _protocol_stream():
    """stdout for the protocol only; anything else printed goes to stderr."""
    stream = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return stream


def _warm_imports(emit) -> None:
    """matplotlib for the end-of-run plot, imported as the first run starts; then ``{"warm": true}`` (the
    training process measures its input model once the logger's start-up work is done)."""
    try:
        pyplot()
    except Exception:  # noqa: BLE001 - the plot record reports its own failure
        pass
    emit({"warm": True})


class _Session:
    """One run's logging: an Applier (store or journal) and the run ids already reported."""

    def __init__(self, sid: str, init: dict, emit):
        self.sid, self.emit = sid, emit
        self.folder = Path(init["folder"])
        self.replayer = Replayer(lambda: live_folder(self.folder), http_timeout_s=init["http_timeout_s"],
                                 http_retries=init["http_retries"])
        self.applier = Applier(self.replayer, self.folder, init["target"],
                               lambda text: emit({"sid": sid, "warn": text}))
        self.known: dict[str, str] = {}
        self.applier.resend()
        self.report_binds()

    def report_binds(self) -> None:
        for key, run_id in list(self.replayer.ids.items()):
            if self.known.get(key) != run_id:
                self.known[key] = run_id
                self.emit({"sid": self.sid, "bind": key, "run_id": run_id})

    def handle(self, record: dict) -> None:
        if record["op"] == "folder":
            self.folder = self.applier.folder = Path(record["path"])
        else:
            self.applier.handle(record)
        self.report_binds()
        self.emit({"sid": self.sid, "ack": record.get("seq")})

    def close(self) -> None:
        pending = not self.applier.finish()
        self.report_binds()
        self.emit({"sid": self.sid, "closed": True, "pending": pending})


def _dispatch(message: dict, sessions: dict, emit) -> None:
    if "open" in message:
        sessions[message["open"]] = _Session(message["open"], message, emit)
    elif "close" in message:
        session = sessions.pop(message["close"], None)
        if session is not None:
            session.close()
    elif message.get("sid") in sessions:
        sessions[message["sid"]].handle(message)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the run ends us (stdin)
    out = _protocol_stream()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    lock = threading.Lock()

    def emit(message: dict) -> None:
        with lock:
            out.write(json.dumps(message) + "\n")
            out.flush()

    # requests (mlflow's client) adds its warning filters as it is imported; a ``catch_warnings`` block leaving in
    # another thread restores the filters it saved and drops them, and urllib3's SOCKS DependencyWarning then
    # reaches stderr beside the run's one-line messages. Imported before any thread starts, they are in every
    # snapshot.
    import requests  # noqa: F401 - imported for its side effect (the warning filters)
    threading.Thread(target=_warm_imports, args=(emit,), daemon=True).start()
    sessions: dict[str, _Session] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            _dispatch(json.loads(line), sessions, emit)
        except Exception:  # noqa: BLE001 - unacknowledged records are journaled by the training process
            logging.getLogger("fedcore_adapter").exception("tracking logger: message dropped")
    for session in sessions.values():  # the training process went away: finish what it sent
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
