"""``fedcore-adapter``: the Hydra app, and a few subcommands.

    fedcore-adapter [overrides...]          run a setup (default: RAW on MNIST-1D)
    fedcore-adapter -m setup=raw,test       a sweep (Hydra multirun)
    fedcore-adapter --cfg job setup=test    print the composed config, the setup resolved
    fedcore-adapter setups                  list the named setups and their chains
    fedcore-adapter compare DIR [DIR ...]   comparison table + plot across runs
    fedcore-adapter train | fit-target | inference [overrides...]   the seed's fc_* scripts (entrypoints/)
    fedcore-adapter sweep OVERRIDES...      runs (setups x models x seeds x overrides) on the Dask cluster
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Optional

SETUP_SCOPED = ("nodes.", "common.")
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--experimental-rerun", "--info", "-i"}
log = logging.getLogger("fedcore_adapter")


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


def _one_line(err: BaseException) -> str:
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
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .resources import conf_dir

    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        return _one_line(err)
    return None


def _task(cfg) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from .errors import FedcoreError
    from .jobs import run_from_config
    from .results import summary_table

    logging.getLogger("fedcore_adapter").setLevel(logging.INFO)
    plain = OmegaConf.to_container(cfg, resolve=True)
    choices = HydraConfig.get().runtime.choices
    label = plain.get("model_name") or choices.get("model")
    try:
        result = run_from_config(plain, model_label=label)
    except (FedcoreError, FileNotFoundError, ImportError) as err:
        if plain.get("debug"):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    print(summary_table(result.metrics))
    print(f"results: {result.output_dir}")
    last = result.metrics[-1]
    return last.get("accuracy") if isinstance(last.get("accuracy"), float) else None


def show_job_config(argv: list[str]) -> int:
    """``--cfg job``: the composed config plus ``resolved_setup`` (the setup as it will run), as YAML."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .jobs import build_setup
    from .resources import conf_dir

    overrides = [a for a in argv if not a.startswith("-") and a != "job"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["resolved_setup"] = build_setup(plain).to_dict()
    print(OmegaConf.to_yaml(OmegaConf.create(plain)), end="")
    return 0


def exit_if_not_composable(argv: list[str], config_name: str) -> None:
    """One line on stderr and exit status 2 when the config does not compose (see :func:`composition_error`)."""
    problem = composition_error(argv, config_name)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def _wants_job_config(argv: list[str]) -> bool:
    for flag, value in zip(argv, argv[1:] + [""]):
        if flag in ("--cfg", "-c"):
            return value == "job"
    return False


def run_app(argv: list[str]) -> None:
    import hydra

    from .resources import conf_dir

    argv = normalize_argv(argv)
    if _wants_job_config(argv) and "-m" not in argv and "--multirun" not in argv:
        return _run_subcommand(show_job_config, argv)
    exit_if_not_composable(argv, "config")
    sys.argv = [sys.argv[0], *argv]
    app = hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")(_task)
    app()


def list_setups(argv: list[str]) -> int:
    """Print the named setups with their chains."""
    from .setups import load_setup, named_setups

    for name in named_setups():
        setup = load_setup(name)
        chain = " -> ".join(n.kind for n in setup.nodes)
        print(f"{name:<12} {chain}")
        if setup.description:
            print(f"{'':<12} {setup.description}")
    return 0


def _compare(argv: list[str]) -> int:
    from .report import main as report_main

    return report_main(argv)


def _sweep(argv: list[str]) -> int:
    from .distributed.sweep import main as sweep_main

    return sweep_main(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], Optional[int]]] = {"setups": list_setups, "compare": _compare,
                                                                 "sweep": _sweep}
from . import entrypoints  # noqa: E402 - import-light: each command imports its module when run
SUBCOMMANDS["train"] = entrypoints.train
SUBCOMMANDS["fit-target"] = entrypoints.fit_target
SUBCOMMANDS["inference"] = entrypoints.inference


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return _run_subcommand(SUBCOMMANDS[argv[0]], argv[1:])
    run_app(argv)


def _run_subcommand(fn: Callable[[list[str]], Optional[int]], argv: list[str]) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .errors import FedcoreError

    try:
        code = fn(argv)
    except (FedcoreError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
