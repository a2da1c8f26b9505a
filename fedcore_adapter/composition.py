"""Composing a config with Hydra from a user's command line (the main command's and the subcommands').

Overrides as users write them (flags anywhere, ``nodes.1.epochs=3`` without ``++``), a composition that
fails ends in one line and exit status 2, and a Hydra app run on ``conf/<config_name>.yaml``.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

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


def one_line(err: BaseException) -> str:
    """An error as the one line a user sees (Hydra's search path and hints left out)."""
    text = str(err).split("Config search path:")[0]  # Hydra's search path is noise to a user
    text = " ".join(text.split()).replace(", set env var HYDRA_FULL_ERROR=1 to see chained exception.", "")
    return text or type(err).__name__


def composition_error(argv: list[str], config_name: str = "config") -> Optional[str]:
    """Why ``conf/<config_name>.yaml`` does not compose with these overrides, as one line (None when it does).

    A single run is composed once up front so that an unknown config group option (``model=nope``)
    or key (``setpu=raw``) ends like every other bad input, not in Hydra's multi-line report. Runs
    with flags (``-m``, ``--help``, ``--cfg`` ...) and ``hydra.*`` overrides are left to Hydra."""
    if any(a.startswith("-") for a in argv):
        return None
    from hydra import compose, initialize_config_dir  # hydra is imported only where a config is composed
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .resources import conf_dir

    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        return one_line(err)
    return None


def run_hydra_app(task: Callable[[Any], Any], config_name: str, argv: list[str]) -> None:
    """Run ``task`` as a Hydra app on ``conf/<config_name>.yaml`` with ``argv`` as its command line."""
    import hydra  # hydra's app machinery is imported only to run (setups, compare and --help stay fast)

    from .resources import conf_dir

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
