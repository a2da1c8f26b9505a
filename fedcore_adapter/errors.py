"""Exceptions whose message is the one line a user sees."""
from __future__ import annotations

import difflib
import re
import sys
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


def speaks_for_itself(err: BaseException) -> bool:
    """True for errors whose message is written for users: the package's own, Hydra's and OmegaConf's (a bad
    override), a missing file or package. Other errors are named by their type in :func:`error_line`."""
    own = (FedcoreError, FileNotFoundError, ImportError)
    # Hydra's errors only where Hydra is loaded already (an error cannot come from a module never imported)
    foreign = tuple(getattr(sys.modules[module], name) for module, name in _USER_FACING if module in sys.modules)
    return isinstance(err, own + foreign)


_USER_FACING = (("hydra.errors", "HydraException"), ("omegaconf.errors", "OmegaConfBaseException"))
_HYDRA_NOISE = ", set env var HYDRA_FULL_ERROR=1 to see chained exception."


def _squeezed(text: str) -> str:
    """``text`` without whitespace nor its escapes: a message quoted by ``repr`` (Hydra quotes causes so) still
    matches itself."""
    return re.sub(r"\s+|\\[ntr]", "", text)


def error_line(err: BaseException, *, typed: bool | None = None, limit: int | None = None) -> str:
    """``err`` as the one line a user sees: its message with every run of whitespace as one space and
    Hydra's config search path and hint left out.

    ``typed``: prefix the type (``KeyError: 'x'``); by default unless :func:`speaks_for_itself`. An error
    raised ``from`` another names that cause's root (``...; cause: OSError: ...``) unless the message
    already says it or it is a FedcoreError (whose message is complete). ``limit``: the most characters
    (the cut ends in ``...``). A message-less error is its type's name."""
    line = _message(err, typed)
    cause = None if isinstance(err, FedcoreError) else _root_cause(err)
    if cause is not None and _squeezed(_message(cause, False)) not in _squeezed(line):
        line += f"; cause: {_message(cause, None)}"
    return line if limit is None or len(line) <= limit else line[:limit - 3] + "..."


def _message(err: BaseException, typed: bool | None) -> str:
    text = " ".join(str(err).split("Config search path:")[0].split()).replace(_HYDRA_NOISE, "")
    if typed is None:
        typed = not speaks_for_itself(err)
    return f"{type(err).__name__}: {text}" if typed and text else text or type(err).__name__


def _root_cause(err: BaseException) -> BaseException | None:
    """The last error of the ``raise ... from`` chain below ``err`` (None without one; a cycle ends the walk)."""
    cause, seen = err.__cause__, {id(err)}
    while cause is not None and cause.__cause__ is not None and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__
    return cause
