"""``model._target_`` / ``data._target_`` / ``loss._target_`` import the user's code from the working directory."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "fedcore-adapter"  # the console script, as a user types it
MY_PKG = '''import torch

from tests.helpers import build_tiny_data as build_data, build_tiny_mlp as build_model


class MyLoss(torch.nn.CrossEntropyLoss):
    def __init__(self):
        super().__init__()
        print("my_pkg.MyLoss built")
'''
FAST = ["tracking=none", "model=custom", "data=custom", "nodes.0.epochs=1", "nodes.0.progress=false",
        "common.latency_repeats=2", "output_dir=out"]


def console(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(cwd)}  # the package itself, not the user's folder
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_the_console_script_builds_model_data_and_loss_from_a_package_in_the_working_directory(tmp_path):
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text(MY_PKG)
    proc = console(*FAST, "model._target_=my_pkg.build_model", "data._target_=my_pkg.build_data",
                   "loss={_target_: my_pkg.MyLoss}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "my_pkg.MyLoss built" in proc.stdout and "results: out/RAW" in proc.stdout


def test_a_target_that_is_nowhere_names_the_folder_searched_and_the_fix(tmp_path):
    proc = console(*FAST, "model._target_=my_pkg.build_model", "data._target_=tests.helpers.build_tiny_data",
                   cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: model._target_='my_pkg.build_model' could not be built: no module 'my_pkg' in the working directory "
        f"({tmp_path}) nor elsewhere on the import path; run from the folder that holds my_pkg/ (or my_pkg.py), "
        f"install it (pip install -e .), or add its folder to PYTHONPATH"]
