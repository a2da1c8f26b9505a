"""Where the shipped setups and Hydra configs are: inside the wheel, or at the source checkout's top level."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"fedcore_adapter is installed without its {name}/ folder (looked in {_PACKAGE})")


def setups_dir() -> Path:
    return _find("setups")


def conf_dir() -> Path:
    return _find("conf")
