"""User code named by ``_target_`` (model, data, loss): imported from the working directory as ``python -m`` does.

The ``fedcore-adapter`` console script, unlike ``python -m`` and pytest, does not put the working
directory on the import path; :func:`importable_from_working_directory` does, before anything is built.
:func:`import_problem` says why a dotted path cannot be imported: where Python looked and the fix.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional


def importable_from_working_directory() -> None:
    """Put the working directory first on ``sys.path`` (as ``python -m`` does), once."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def import_problem(target: str) -> Optional[str]:
    """Why the top-level module of ``target`` (``my_pkg.build_model``) cannot be found, naming the folders
    searched and the fix; None when it can."""
    top = str(target).split(".")[0]
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return (f"no module {top!r} in the working directory ({os.getcwd()}) nor elsewhere on the import path; "
            f"run from the folder that holds {top}/ (or {top}.py), install it (pip install -e .), "
            f"or add its folder to PYTHONPATH")
