"""``fedcore-adapter --help`` and ``fedcore-adapter <command> --help``: what a user can type.

Read from the shipped files (setups/*.yaml, conf/ groups, the commands' docstrings) without
importing torch, mlflow, dask or Hydra, so that help is instant.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Callable, Mapping, Optional

from .resources import conf_dir, setups_dir

_PACKAGE = Path(__file__).resolve().parent
COMMANDS = {  # one line each; a command added to cli.SUBCOMMANDS without a line here shows its docstring's first line
    "setups": "list the named setups and their chains of nodes",
    "compare": "comparison table + plot across results folders or a tracking store",
    "sweep": "many runs (setups x models x seeds x overrides) on the Dask cluster, one table at the end",
    "train": "the seed's fc_train: fit a model through a setup, optionally save it",
    "fit-target": "the seed's fc_fit_target: compress and test on every fold of fold_list",
    "inference": "the seed's fc_inference: outputs of a saved model on a data split",
    "search": "search the chain's settings (Optuna) and report the Pareto front",
}
HYDRA_COMMANDS = {"train": "entrypoints/train.py", "fit-target": "entrypoints/fit_target.py",
                  "inference": "entrypoints/inference.py", "search": "search/cli.py"}  # Hydra apps: help = docstring
DOCSTRING_COMMANDS = {"sweep": "distributed/sweep.py"}  # help = the module docstring, read without importing it
OVERRIDES = [
    ("setup=composite_1", "a named setup (case-insensitive) or a path to your setup .yaml"),
    ("model=digits_cnn data=digits", "a built-in model and data module (see the groups below)"),
    ("model=custom model._target_=my_pkg.build_model", "your own model (data=custom data._target_=... alike)"),
    ("model_name=my_model", "names the results folder <output_dir>/<SETUP>_<model_name>"),
    ("common.seed=1", "options of the whole setup: seed, device, limit_train_batches, num_threads ..."),
    ("nodes.0.epochs=3 nodes.pruning.pruning_ratio=0.5", "a node's field, by index or by kind"),
    ("output_dir=composition_results", "where results folders go"),
    ("resume=true", "continue an interrupted run after its last finished node"),
    ("tracking=none | tracking.uri=http://127.0.0.1:5000", "MLflow off, or log to a tracking server"),
    ("-m setup=raw,test common.seed=0,1", "a sweep: every combination (hydra/launcher=dask cluster=local: on Dask)"),
    ("--cfg job setup=test", "print the composed config and the setup as it will run"),
]


def _setup_lines() -> list[str]:
    import yaml

    lines = []
    for path in sorted(setups_dir().glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        name = data.get("name") or path.stem.upper()
        description = " ".join(str(data.get("description") or "").split())
        lines.append(f"  {name:<13}{description}")
    return lines


def _group_options(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")))


def _first_line(fn: Callable) -> str:
    return ((fn.__doc__ or "").strip().splitlines() or [""])[0].rstrip(".")


def main_help(subcommands: Mapping[str, Callable]) -> str:
    """The text of ``fedcore-adapter --help``."""
    width = max(len(name) for name in subcommands) + 2
    commands = [f"  {name:<{width}}{COMMANDS.get(name) or _first_line(fn)}" for name, fn in subcommands.items()]
    overrides = [f"  {example}\n      {what}" for example, what in OVERRIDES]
    groups = [f"  {group:<10}{_group_options(group)}" for group in ("model", "data", "tracking", "cluster")]
    return "\n".join([
        "usage: fedcore-adapter [OVERRIDES...]            run a setup (default: RAW on MNIST-1D)",
        "       fedcore-adapter -m [OVERRIDES...]         a sweep (Hydra multirun)",
        "       fedcore-adapter COMMAND [ARGS...]         (fedcore-adapter COMMAND --help)",
        "",
        "Composite compression of a PyTorch model: a setup's chain of nodes (training, pruning, low-rank,",
        "quantization, distillation), each model measured, checkpointed and logged to MLflow.",
        "",
        "commands:", *commands,
        "",
        "named setups (setup=NAME):", *_setup_lines(),
        "",
        "most used overrides:", *overrides,
        "",
        "config groups:", *groups,
        "",
        "More: README.md; Hydra's own help: fedcore-adapter --hydra-help.",
    ])


def command_help(name: str) -> Optional[str]:
    """The ``--help`` text of a command that has no argument parser of its own (None: it has one)."""
    if name == "setups":
        return ("usage: fedcore-adapter setups\n\n"
                "List the named setups (setups/*.yaml): name, chain of node kinds and description.\n"
                "Run one with: fedcore-adapter setup=NAME [OVERRIDES...]")
    if name in HYDRA_COMMANDS:
        return (f"usage: fedcore-adapter {name} [OVERRIDES...]\n\n{_docstring(HYDRA_COMMANDS[name])}\n\n"
                f"Every override of the main command applies too (fedcore-adapter --help); "
                f"the config: conf/{name.replace('-', '_')}.yaml.")
    if name in DOCSTRING_COMMANDS:
        return f"usage: fedcore-adapter {name} OVERRIDES...\n\n{_docstring(DOCSTRING_COMMANDS[name])}"
    return None


def _docstring(module_file: str) -> str:
    """A module's docstring as terminal text: reST's ``literal`` quotes become plain `literal` ones."""
    return (ast.get_docstring(ast.parse((_PACKAGE / module_file).read_text())) or "").replace("``", "`")


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)
