"""``fedcore-adapter``: the Hydra app, and a few subcommands.

    fedcore-adapter [overrides...]          run a setup (default: RAW on MNIST-1D)
    fedcore-adapter -m setup=raw,test       a sweep (Hydra multirun)
    fedcore-adapter --cfg job setup=test    print the composed config, the setup resolved
    fedcore-adapter setups                  list the named setups and their chains
    fedcore-adapter compare DIR [DIR ...]   comparison table + plot across runs
    fedcore-adapter train | fit-target | inference [overrides...]   the seed's fc_* scripts (entrypoints/)
    fedcore-adapter sweep OVERRIDES...      runs (setups x models x seeds x overrides) on the Dask cluster
    fedcore-adapter search [overrides...]   multi-objective search over composite chains (search/)
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
from typing import Callable, Optional

from . import entrypoints
from .composition import exit_if_not_composable, normalize_argv
from .errors import FedcoreError, error_line, speaks_for_itself
from .help import command_help, main_help, wants_help
from .report import main as report_main
from .resources import conf_dir
from .results import summary_table
from .search.cli import main as search_main
from .setups import named_setups
from .signals import RESUME_COMMAND, exit_status, sigterm_interrupts

log = logging.getLogger("fedcore_adapter")
# Start-up time: this module serves ``--help`` and ``setups``, so pydantic and torch (building), dask (sweep)
# and Hydra's app machinery are imported inside the functions that run a job.


def _task(cfg) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    # lazy: building (pydantic, torch) and sweep_report (Hydra) cost `--help` a second of start-up
    from .building import run_from_config
    from .sweep_report import note_results_folder

    logging.getLogger("fedcore_adapter").setLevel(logging.INFO)
    plain = OmegaConf.to_container(cfg, resolve=True)
    choices = HydraConfig.get().runtime.choices
    label = plain.get("model_name") or choices.get("model")
    plain["output_dir"] = job_output_dir(plain.get("output_dir"))
    try:
        result = run_from_config(plain, model_label=label)
    except Exception as err:  # noqa: BLE001 - every failure is one line (debug=true: the traceback)
        if plain.get("debug"):
            raise
        message = error_line(err)
        if not speaks_for_itself(err):
            message += " (debug=true shows the traceback)"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    note_results_folder(result.output_dir)
    print(summary_table(result.metrics))
    print(f"results: {result.output_dir}")
    last = result.metrics[-1]
    return last.get("accuracy") if isinstance(last.get("accuracy"), float) else None


def job_output_dir(output_dir: Optional[str]) -> str:
    """A multirun job writes into its own job folder (``<sweep dir>/<job number>``) under any launcher, so
    that no two jobs of a sweep share a results folder and ``compare <sweep dir>`` finds them all."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.runtime.output_dir:
        return str(hydra_cfg.runtime.output_dir)
    return output_dir or "composition_results"


def show_job_config(argv: list[str]) -> int:
    """``--cfg job``: the composed config plus ``setup_resolved`` (the setup as it will run), as YAML."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .building import config_setup  # lazy: building imports pydantic, and torch when run; `--help` does not

    overrides = [a for a in argv if not a.startswith("-") and a != "job"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["setup_resolved"] = config_setup(plain).to_dict()
    print(OmegaConf.to_yaml(OmegaConf.create(plain)), end="")
    return 0


def _wants_job_config(argv: list[str]) -> bool:
    for flag, value in zip(argv, argv[1:] + [""]):
        if flag in ("--cfg", "-c"):
            return value == "job"
    return False


def run_app(argv: list[str]) -> None:
    import hydra

    argv = normalize_argv(argv)
    if _wants_job_config(argv) and "-m" not in argv and "--multirun" not in argv:
        return _run_subcommand(show_job_config, argv)
    exit_if_not_composable(argv, "config")
    sys.argv = [sys.argv[0], *argv]
    app = hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")(_task)
    app()


def list_setups(argv: list[str]) -> int:
    """Print the named setups with their chains."""
    from .building import resolve_setup  # lazy: building imports pydantic; `--help` does not need it

    for name in named_setups():
        setup = resolve_setup(name)
        chain = " -> ".join(n.kind for n in setup.nodes)
        print(f"{name:<12} {chain}")
        if setup.description:
            print(f"{'':<12} {setup.description}")
    return 0


def _sweep(argv: list[str]) -> int:
    from .distributed.sweep import main as sweep_main  # lazy: dask takes half a second; only `sweep` needs it

    return sweep_main(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], Optional[int]]] = {
    "setups": list_setups, "compare": report_main, "sweep": _sweep, "search": search_main, "train": entrypoints.train,
    "fit-target": entrypoints.fit_target, "inference": entrypoints.inference}


def main(argv: Optional[list[str]] = None) -> None:
    """Ctrl-C and SIGTERM end every command the same way: one line on stderr, exit status 130 / 143. Output piped
    into a reader that stops early (``fedcore-adapter setups | head -1``) ends quietly."""
    try:
        _main(argv)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(1)


def _main(argv: Optional[list[str]]) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _print_help(argv):
        return
    try:
        with sigterm_interrupts():
            _set_resume_command(argv)
            if argv and argv[0] in SUBCOMMANDS:
                return _run_subcommand(SUBCOMMANDS[argv[0]], argv[1:])
            run_app(argv)
    except KeyboardInterrupt as err:
        text = " ".join(str(err).split()) or "interrupted"
        print(text if text.startswith("interrupted") else f"interrupted: {text}", file=sys.stderr)
        sys.exit(exit_status(err))


def _set_resume_command(argv: list[str]) -> None:
    kept = [a for a in argv if not a.lstrip("+").startswith("resume=")]
    RESUME_COMMAND.set(shlex.join(["fedcore-adapter", *kept, "resume=true"]))


def _print_help(argv: list[str]) -> bool:
    """``--help`` of the main command, and of the subcommands that have no argument parser of their own."""
    if not wants_help(argv):
        return False
    if argv[0] in SUBCOMMANDS:
        text = command_help(argv[0])
        if text is None:
            return False  # the subcommand prints its own
    else:
        text = main_help(SUBCOMMANDS)
    print(text)
    return True


def _run_subcommand(fn: Callable[[list[str]], Optional[int]], argv: list[str]) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        code = fn(argv)
    except (FedcoreError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
