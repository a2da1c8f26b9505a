"""Nothing lost when the store is down: ``tracking_pending.jsonl`` in the results folder.

:class:`Applier` applies records in order through a ``store.Replayer``. The first
time the store cannot be reached it warns once and from then on appends every
record to the pending file; at the end of the run it tries once more to send it.
:func:`sync_pending` sends it later by hand. Records are at-least-once: replaying
is idempotent (params only add new keys, child runs are found by key).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

from ..errors import error_line
from .store import Replayer, is_unreachable

log = logging.getLogger("fedcore_adapter")
PENDING_FILE = "tracking_pending.jsonl"
PARTIAL_SUFFIX = ".partial"  # results.PARTIAL_SUFFIX, repeated so the logger process never imports torch


def live_folder(folder: Path) -> Path:
    """``folder``, or the completed folder it was renamed to (``<name>.partial`` -> ``<name>``)."""
    folder = Path(folder)
    if not folder.exists() and folder.name.endswith(PARTIAL_SUFFIX):
        final = folder.with_name(folder.name[: -len(PARTIAL_SUFFIX)])
        if final.exists():
            return final
    return folder


def read_pending(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def append_pending(path: Path, records: list[dict], mode: str = "a") -> None:
    with open(path, mode) as handle:
        handle.writelines(json.dumps({k: v for k, v in r.items() if k not in ("seq", "sid")}, default=str) + "\n"
                          for r in records)


def append_pending_live(folder: Path, records: list[dict]) -> None:
    """Append to the pending file of ``folder`` wherever it now is. The engine renames the results folder
    (``<name>.partial`` -> ``<name>``) while the logger may still be journaling; a write that loses that
    race is made again in the renamed folder."""
    for attempt in range(3):
        try:
            return append_pending(live_folder(folder) / PENDING_FILE, records)
        except FileNotFoundError:
            if attempt == 2:
                raise


def with_head(target: dict, ids: dict[str, str], records: list[dict]) -> list[dict]:
    """``records`` preceded by what replaying them needs: the store (once), and the runs already opened."""
    binds = [{"op": "bind", "key": k, "run_id": v} for k, v in ids.items()]
    if records and records[0]["op"] == "target":
        return records[:1] + binds + records[1:]
    return [target] + binds + records


def replay_file(path: Path, replayer) -> bool:
    """Apply the records of ``path`` in order; True (and the file removed) when all went through."""
    records = read_pending(path)
    for i, record in enumerate(records):
        try:
            replayer.apply(record)
        except Exception as err:  # noqa: BLE001
            if not is_unreachable(err):
                log.debug("tracking record %s dropped: %s", record.get("op"), err)
                continue
            target = replayer.target or next(r for r in records if r["op"] == "target")
            append_pending(path, with_head(target, replayer.ids, records[i:]), mode="w")
            return False
    path.unlink(missing_ok=True)
    return True


def sync_pending(results_dir: str | Path, tracking_uri: Optional[str] = None, *, http_timeout_s: float = 10.0,
                 http_retries: int = 2) -> bool:
    """Send what a run could not log (``<results_dir>/tracking_pending.jsonl``) to its tracking store.

    ``tracking_uri`` sends it to another store (its runs are then created there). Returns
    True when everything went through; the file is then removed.
    """
    folder = Path(results_dir)
    path = folder / PENDING_FILE
    if not path.exists():
        return True
    if tracking_uri:
        records = [r for r in read_pending(path) if r["op"] != "bind"]
        append_pending(path, [{**r, "uri": tracking_uri} if r["op"] == "target" else r for r in records], mode="w")
    replayer = Replayer(lambda: folder, http_timeout_s=http_timeout_s, http_retries=http_retries, dedupe=True)
    return replay_file(path, replayer)


class Applier:
    """Applies records one by one; journals them from the first time the store is unreachable."""

    def __init__(self, replayer, folder: Path, target: dict, warn: Callable[[str], None]):
        self.replayer = replayer
        self.folder = Path(folder)
        self.target = target
        self.warn = warn
        self.offline = False

    @property
    def pending_path(self) -> Path:
        return live_folder(self.folder) / PENDING_FILE

    def resend(self) -> None:
        """A resumed run first sends what its interrupted attempt could not log."""
        if self.pending_path.exists() and not replay_file(self.pending_path, self.replayer):
            self.go_offline(ConnectionError("the pending records of the interrupted attempt could not be sent"), [])

    def handle(self, record: dict) -> None:
        if self.offline:
            return self._journal([record])
        try:
            self.replayer.apply(record)
        except Exception as err:  # noqa: BLE001 - a tracking failure never reaches the run
            if is_unreachable(err):
                self.go_offline(err, [record])
            else:
                log.debug("tracking record %s dropped: %s", record.get("op"), err)

    def finish(self) -> bool:
        """End of run: if the store came back, send the journal. True when nothing is pending."""
        if self.offline:
            try:
                if replay_file(self.pending_path, self.replayer):
                    self.offline = False
            except Exception as err:  # noqa: BLE001
                log.debug("tracking store still unreachable: %s", err)
        return not self.pending_path.exists()

    def go_offline(self, err: BaseException, records: list[dict]) -> None:
        if not self.offline:
            self.offline = True
            records = with_head(self.replayer.target or self.target, self.replayer.ids, records)
            self.warn(offline_message(self.target["uri"], err, self.pending_path))
        self._journal(records)

    def _journal(self, records: list[dict]) -> None:
        try:
            append_pending_live(self.folder, records)
        except OSError as err:
            log.debug("could not journal tracking records: %s", err)


def offline_message(uri: str, err: BaseException, path: Path) -> str:
    reason = error_line(err, typed=True, limit=240)
    folder = path.parent
    if folder.name.endswith(PARTIAL_SUFFIX):  # where it will be once the run completes
        folder = folder.with_name(folder.name[: -len(PARTIAL_SUFFIX)])
    return (f"MLflow tracking at {uri} failed ({reason}); the run goes on. What could not be logged is kept in "
            f"the results folder, {folder / path.name} (send it later with "
            f"fedcore_adapter.tracking.sync_pending('{folder}'))")
