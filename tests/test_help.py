"""``fedcore-adapter --help`` and every command's ``--help``, typed as a user types them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedcore_adapter.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mlflow", "dask", "distributed", "transformers")


def run(*args, cwd):
    """The ``fedcore-adapter`` console script of this environment (``python -m fedcore_adapter`` without one)."""
    script = Path(sys.executable).with_name("fedcore-adapter")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fedcore_adapter"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_help_lists_the_commands_the_named_setups_and_the_most_used_overrides(tmp_path):
    proc = run("--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    text = proc.stdout
    assert "powered by Hydra" not in text
    commands = text.split("commands:\n")[1].split("\n\n")[0]
    assert [line.split()[0] for line in commands.splitlines()] == list(SUBCOMMANDS)
    assert all(len(line.split()) > 2 for line in commands.splitlines())  # each with its line
    for path in sorted((ROOT / "setups").glob("*.yaml")):
        setup = yaml.safe_load(path.read_text())
        assert f"  {setup['name']:<13}{' '.join(setup['description'].split())}" in text, path.name
    for override in ("setup=composite_1", "model=custom model._target_=my_pkg.build_model", "common.seed=1",
                     "nodes.0.epochs=3", "tracking=none", "-m setup=raw,test"):
        assert override in text, override


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_command_has_its_help(tmp_path, command):
    proc = run(command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: fedcore-adapter {command}"), proc.stdout[:200]
    assert "powered by Hydra" not in proc.stdout and not (tmp_path / "composition_results").exists()
    assert "``" not in proc.stdout  # terminal text, not the docstring's reST markup


@pytest.mark.parametrize("argv", [["--help"], ["setup=raw", "-h"], *[[c, "--help"] for c in SUBCOMMANDS]])
def test_help_imports_neither_torch_nor_mlflow_nor_dask(tmp_path, argv):
    code = ("import sys\nfrom fedcore_adapter.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            f"    pass\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:] + proc.stderr[-2000:]


@pytest.mark.parametrize("argv", [["setups"], ["--help"], ["sweep", "--help"]])
def test_output_piped_into_a_reader_that_stops_early_ends_quietly(argv):
    script = Path(sys.executable).with_name("fedcore-adapter")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fedcore_adapter"]
    proc = subprocess.Popen([*command, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # `| head -0`: the reader is gone before anything is written
    assert proc.stderr.read() == b"" and proc.wait(timeout=120) == 1
