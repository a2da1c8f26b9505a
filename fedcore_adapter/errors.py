"""Exceptions whose message is the one line a user sees."""
from __future__ import annotations

import difflib
from typing import Iterable


def nearest(word: str, allowed: Iterable[str]) -> str:
    """`` (did you mean X?)`` naming the allowed names closest to ``word`` (difflib), else ''."""
    close = difflib.get_close_matches(str(word), sorted(map(str, allowed)), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


class FedcoreError(Exception):
    """Base class: the message is complete, one line, and says how to fix it."""


class ConfigError(FedcoreError):
    """A setup, override or option is invalid (not a ValueError, so pydantic never wraps it)."""


class NodeError(FedcoreError, RuntimeError):
    """A node could not be applied to the model it received."""

    def __init__(self, node: str, reason: str):
        super().__init__(f"node {node}: {reason}")
        self.node = node
        self.reason = reason


class DataError(FedcoreError):
    """A data module or batch does not follow the expected protocol."""


class RunError(FedcoreError, RuntimeError):
    """User code, data, model or the file system failed during a run (the original error is ``__cause__``)."""

    def __init__(self, message: str, node: str = ""):
        super().__init__(message)
        self.node = node


def error_line(err: BaseException) -> str:
    """Any error as one line: a FedcoreError's message as it is, another's prefixed with its type."""
    text = " ".join(str(err).split())
    if isinstance(err, FedcoreError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
