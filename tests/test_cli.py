"""The ``fedcore-adapter`` command: runs, overrides, listings, and one-line errors with a non-zero exit."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedcore_adapter.composition import normalize_argv

ROOT = Path(__file__).resolve().parents[1]
FAST = ["tracking=none", "model=custom", "model._target_=tests.helpers.build_tiny_mlp", "data=custom",
        "data._target_=tests.helpers.build_tiny_data", "nodes.0.epochs=1", "nodes.0.progress=false",
        "common.latency_repeats=2"]


def cli(*args, cwd):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    import os

    env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "fedcore_adapter", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_normalize_argv_lets_setup_fields_be_set_without_plus_and_flags_anywhere():
    assert normalize_argv(["setup=raw", "nodes.0.epochs=3", "--cfg", "job", "common.seed=1", "+model.width=8"]) == \
        ["--cfg", "job", "setup=raw", "++nodes.0.epochs=3", "++common.seed=1", "+model.width=8"]


def test_runs_a_setup_on_a_custom_model_and_data_and_prints_the_summary(tmp_path):
    proc = cli(*FAST, "output_dir=out", "model_name=mlp", "setup=raw", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "results: out/RAW_mlp" in proc.stdout and "training" in proc.stdout
    run = json.loads((tmp_path / "out" / "RAW_mlp" / "run.json").read_text())
    assert run["status"] == "completed"
    config = (tmp_path / "out" / "RAW_mlp" / "config.yaml").read_text()
    assert "build_tiny_mlp" in config and "setup_resolved" in config


@pytest.mark.parametrize("override, message", [
    ("setup=nope", "error: unknown setup 'nope'; named setups: "),
    ("setup=missing/file.yaml", "error: setup file 'missing/file.yaml' does not exist"),
    ("nodes.0.epochs=-1", "error: nodes[0] (training).epochs = -1: Input should be greater than or equal to 0"),
    ("nodes.0.learning_rate=abc", "error: nodes[0] (training).learning_rate = 'abc': Input should be a valid number"),
    ("model._target_=nowhere.build",
     "error: model._target_='nowhere.build' could not be built: no module 'nowhere' in the working directory"),
    ("data._target_=tests.helpers.NoTrainLoaderDataModule",
     "error: data module NoTrainLoaderDataModule has no train_dataloader()"),
    ("data._target_=tests.helpers.EmptyDataModule", "error: train_dataloader() yielded no batches"),
    ("tracking=nope",
     "error: In 'config': Could not find 'tracking/nope' Available options in 'tracking': mlflow none"),
    ("setpu=raw", "error: unknown key 'setpu' in 'setpu=raw' (did you mean setup?); the config's keys: cluster, "),
    ("+setpu=raw", "error: unknown key 'setpu' in '+setpu=raw' (did you mean setup?); the config's keys: cluster, "),
    ("tracking.urri=x", "error: unknown key 'tracking.urri'; keys of tracking: name"),
    ("model.widht=3", "error: unknown key 'model.widht'; keys of model: _target_ (a new argument of model._target_ "
                      "is passed as +model.widht=...)"),
    ("nodes.0.epochz=1", "error: nodes[0] (training).epochz = 1: unknown field (did you mean epochs?); allowed: "),
])
def test_bad_input_exits_non_zero_with_one_line(tmp_path, override, message):
    proc = cli(*FAST, "output_dir=out", override, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not any(p.is_dir() and not p.name.endswith(".partial") and (p / "run.json").exists()
                   for p in (tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_debug_flag_shows_the_full_traceback(tmp_path):
    proc = cli(*FAST, "setup=nope", "debug=true", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_cfg_job_prints_the_setup_resolved_with_overrides(tmp_path):
    proc = cli("--cfg", "job", "setup=raw", "nodes.0.epochs=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "setup_resolved:" in proc.stdout and "name: RAW" in proc.stdout and "epochs: 3" in proc.stdout


def test_setups_subcommand_lists_names_and_chains(tmp_path):
    proc = cli("setups", cwd=tmp_path)
    assert proc.returncode == 0 and "RAW" in proc.stdout and "training" in proc.stdout


def test_multirun_with_the_basic_launcher_runs_each_value_and_ends_with_the_comparison(tmp_path):
    proc = cli("-m", *FAST, "output_dir=out", "model_name=a,b", "hydra.sweep.dir=out/sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    sweep = tmp_path / "out" / "sweep"
    assert (sweep / "0" / "RAW_a" / "run.json").exists() and (sweep / "1" / "RAW_b" / "run.json").exists()
    table = (sweep / "comparison.md").read_text()
    assert "RAW_a" in table and "RAW_b" in table and (sweep / "comparison.csv").exists()
    assert table.split("\n\n", 1)[1].strip() in proc.stdout  # printed as well


def test_the_readme_seed_sweep_keeps_every_job_and_compare_finds_them_all(tmp_path):
    """``-m setup=raw common.seed=0,1``: two jobs, one setup and model; neither replaces the other."""
    proc = cli("-m", *FAST, "output_dir=out", "setup=raw", "common.seed=0,1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [sweep] = (tmp_path / "out" / "sweeps").iterdir()
    seeds = [yaml.safe_load((sweep / job / "RAW" / "config.yaml").read_text())["setup_resolved"]["common"]["seed"]
             for job in ("0", "1")]
    assert seeds == [0, 1]
    compare = cli("compare", str(sweep), "--out", "cmp", cwd=tmp_path)
    assert compare.returncode == 0, compare.stderr
    import csv

    rows = [r for r in csv.DictReader((tmp_path / "cmp" / "comparison.csv").open()) if r["status"] == "completed"]
    assert sorted(Path(r["source"]).parent.name for r in rows) == ["0", "1"]


def test_a_quick_named_setup_runs_every_node_for_one_epoch_on_two_batches(tmp_path):
    proc = cli("setup=ptq_1", "common.max_epochs=1", "common.limit_batches=2", "tracking=none",
               "common.latency_repeats=2", "output_dir=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ran = yaml.safe_load((tmp_path / "out" / "PTQ_1" / "config.yaml").read_text())["setup_resolved"]
    assert [n["kind"] for n in ran["nodes"]] == ["training", "low_rank", "ptq_dynamic"]
    low_rank = ran["nodes"][1]
    assert ran["nodes"][0]["epochs"] == low_rank["method"]["epochs"] == low_rank["finetune_params"]["epochs"] == 1
    assert ran["common"]["limit_train_batches"] == ran["common"]["limit_test_batches"] == 2


def test_help_imports_neither_mlflow_nor_dask_nor_transformers(tmp_path):
    code = ("import sys\nfrom fedcore_adapter.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('mlflow', 'dask', 'distributed', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "[]"
