"""SIGTERM ends a run as Ctrl-C does: both become a ``KeyboardInterrupt`` the engine cleans up after.

``KeyboardInterrupt`` (not ``Exception``) so that no ``except Exception`` in user or library code
swallows it. Exit statuses follow the shell's convention: 128 + the signal's number (130, 143).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from contextvars import ContextVar
from typing import Iterator, Optional

# How to resume, as the user started the run (the CLI sets its command line); shown after an interrupt.
RESUME_COMMAND: ContextVar[Optional[str]] = ContextVar("fedcore_resume_command", default=None)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal; the message is the one line a user sees."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def signal_of(err: BaseException) -> int:
    return getattr(err, "signum", signal.SIGINT)


def exit_status(err: BaseException) -> int:
    return 128 + int(signal_of(err))


def _raise_interrupt(signum, frame) -> None:
    raise RunInterrupted(signum=signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside: SIGTERM raises :class:`RunInterrupted` (main thread only; a handler someone else set is kept)."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Inside: SIGINT and SIGTERM are ignored (the few seconds of cleanup after an interrupt finish)."""
    if not _main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
