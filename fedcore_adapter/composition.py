"""Composing a config with Hydra from a user's command line (the main command's and the subcommands').

Overrides as users write them (flags anywhere, ``nodes.1.epochs=3`` without ``++``), a composition that
fails ends in one line and exit status 2, and a Hydra app run on ``conf/<config_name>.yaml``.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Callable, Optional

from .errors import error_line, nearest
from .resources import conf_dir

SETUP_SCOPED = ("nodes.", "common.")
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--experimental-rerun", "--info", "-i"}


def normalize_argv(argv: list[str]) -> list[str]:
    """Hydra argv as users write it: flags anywhere, ``nodes.1.epochs=3`` / ``common.seed=1`` without ``++``."""
    flags, overrides = [], []
    args = iter(argv)
    for arg in args:
        if arg.startswith("-"):
            flags.append(arg)
            if arg in _VALUE_FLAGS:
                value = next(args, None)
                if value is not None:
                    flags.append(value)
        else:
            overrides.append("++" + arg if arg.startswith(SETUP_SCOPED) and "=" in arg else arg)
    return flags + overrides


def _override_keys(argv: list[str]) -> list[tuple[str, str]]:
    """``(override, key)`` of every override in ``argv`` (flags and their values left out)."""
    out, args = [], iter(argv)
    for arg in args:
        if arg.startswith("-"):
            if arg in _VALUE_FLAGS:
                next(args, None)
        elif "=" in arg:
            out.append((arg, arg.split("=", 1)[0].lstrip("+~")))
    return out


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir  # hydra is imported only where a config is composed

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def unknown_key_error(argv: list[str], config_name: str = "config") -> Optional[str]:
    """One line when an override names a top-level key ``conf/<config_name>.yaml`` does not have, ``+key=...``
    included (Hydra would add it, and nothing would read it); the nearest keys are named."""
    keys = None
    for override, key in _override_keys(argv):
        top = key.split(".")[0].split("/")[0]
        if top == "hydra":
            continue
        if keys is None:
            keys = set(_compose(config_name, []))
        if top not in keys:
            return (f"unknown key {top!r} in {override!r}{nearest(top, keys)}; the config's keys: "
                    f"{', '.join(sorted(keys))}")
    return None


_TARGET_SECTIONS = ("model", "data", "loss")  # +<section>.<arg>=... passes a new argument to its _target_


def _explain_missing_key(message: str, overrides: list[str], config_name: str) -> str:
    """Hydra's "Could not override 'a.b'. To append to your config use +a.b=..." as the nearest keys of ``a``."""
    found = re.search(r"Could not override '([^']+)'", message)
    if not found:
        return message
    key = found.group(1)
    parent, _, leaf = key.rpartition(".")
    try:
        from omegaconf import OmegaConf

        cfg = _compose(config_name, [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key])
        node = OmegaConf.select(cfg, parent) if parent else cfg
        keys = sorted(node.keys()) if hasattr(node, "keys") else []
    except Exception:  # noqa: BLE001 - the plain message is still right
        keys = []
    if not keys:
        return message.split(" To append to your config")[0]
    text = f"unknown key {key!r}{nearest(leaf, keys)}; keys of {parent or 'the config'}: {', '.join(map(str, keys))}"
    if parent.split(".")[0] in _TARGET_SECTIONS:
        text += f" (a new argument of {parent}._target_ is passed as +{key}=...)"
    return text


def composition_error(argv: list[str], config_name: str = "config") -> Optional[str]:
    """Why ``conf/<config_name>.yaml`` does not compose with these overrides, as one line (None when it does).

    An unknown top-level key is refused first (:func:`unknown_key_error`, sweeps included). A single run
    is then composed once up front so that an unknown config group option (``model=nope``) or nested key
    ends like every other bad input, not in Hydra's multi-line report. Runs with flags (``-m``, ``--help``,
    ``--cfg`` ...) are composed by Hydra itself, and ``hydra.*`` overrides are left to Hydra."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        problem = unknown_key_error(argv, config_name)
        if problem or any(a.startswith("-") for a in argv):
            return problem
        _compose(config_name, overrides)
    except (HydraException, OmegaConfBaseException) as err:
        return _explain_missing_key(error_line(err), overrides, config_name)
    return None


def run_hydra_app(task: Callable[[Any], Any], config_name: str, argv: list[str]) -> None:
    """Run ``task`` as a Hydra app on ``conf/<config_name>.yaml`` with ``argv`` as its command line."""
    import hydra  # hydra's app machinery is imported only to run (setups, compare and --help stay fast)

    argv = normalize_argv(argv)
    exit_if_not_composable(argv, config_name)
    sys.argv = [sys.argv[0], *argv]
    hydra.main(version_base=None, config_path=str(conf_dir()), config_name=config_name)(task)()


def exit_if_not_composable(argv: list[str], config_name: str) -> None:
    """One line on stderr and exit status 2 when the config does not compose (see :func:`composition_error`)."""
    problem = composition_error(argv, config_name)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
