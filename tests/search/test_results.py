"""A search's results: the Pareto setups re-run with the same metrics, and an interrupted search resumed."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import yaml

from fedcore_adapter.building import run_from_config
from fedcore_adapter.search.driver import run_search
from fedcore_adapter.search.trial import open_storage
from tests.helpers import wait_until
from tests.search.helpers import DATA, MODEL, SETUP, config

ROOT = Path(__file__).resolve().parents[2]


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_pareto_setup_file_runs_again_with_the_trials_metrics(tmp_path):
    result = run_search(config(tmp_path, trials=3))
    assert result.front
    row = result.front[0]
    path = result.folder / "pareto" / f"trial_{row['trial']:04d}.yaml"
    assert yaml.safe_load(path.read_text())["nodes"][0]["kind"] == "training"  # the whole chain, prefix included
    again = run_from_config({"setup": str(path), "model": MODEL, "data": DATA, "tracking": {"name": "none"},
                             "output_dir": str(tmp_path / "again")})
    last = again.metrics[-1]
    assert (last["params"], last["macs"], last["accuracy"]) == (row["params"], row["macs"], row["accuracy"])


def _search_cli(tmp_path, *extra):
    setup_file = tmp_path / "tiny.yaml"
    setup_file.write_text(yaml.safe_dump(SETUP))
    return [sys.executable, "-m", "fedcore_adapter", "search", f"setup={setup_file}", "model=custom",
            f"model._target_={MODEL['_target_']}", "data=custom", f"data._target_={DATA['_target_']}",
            "tracking=none", f"output_dir={tmp_path / 'out'}", "model_name=tiny", "search.objectives=[params,accuracy]",
            "search.max_accuracy_drop=0.5", "search.moves.insert=[]", *extra]


def test_an_interrupted_search_resumes_and_reruns_the_trial_it_lost(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    folder = tmp_path / "out" / "SEARCH_TINY_tiny"
    proc = subprocess.Popen(_search_cli(tmp_path, "search.trials=3"), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until((folder / "trials" / "trial_0001.partial").exists, "the second trial", timeout_s=300, proc=proc,
                   poll_s=0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-trial: trial 0 done, trial 1 under way
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    storage = open_storage(folder / "study.journal")
    interrupted = optuna.load_study(study_name="search", storage=storage).trials
    running = [t for t in interrupted if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1
    prefix_runs = sorted(p.name for p in (folder / "prefix").iterdir() if p.name.startswith("PREFIX"))

    done = subprocess.run(_search_cli(tmp_path, "search.trials=3", "resume=true"), env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    study = optuna.load_study(study_name="search", storage=open_storage(folder / "study.journal"))
    lost = study.trials[running[0].number]
    assert lost.state == optuna.trial.TrialState.FAIL and lost.user_attrs["lost"]
    rerun = [t for t in study.trials if t.user_attrs.get("rerun_of") == lost.number]
    assert len(rerun) == 1 and rerun[0].params == lost.params and rerun[0].state.name == "COMPLETE"
    rows = [r for r in _csv(folder / "trials.csv") if not r["same_as"]]  # a repeat is told, not run nor counted
    assert len(rows) == 3 and {r["state"] for r in rows} == {"complete"}
    assert sorted(p.name for p in (folder / "prefix").iterdir() if p.name.startswith("PREFIX")) == prefix_runs
    assert "trial 3/3" in done.stdout and "trial 1/3" not in done.stdout  # only what was left ran
    assert "nothing to resume" not in done.stdout + done.stderr


def test_a_search_folder_is_not_overwritten_without_resume(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "out" / "SEARCH_TINY_tiny").mkdir(parents=True)
    (tmp_path / "out" / "SEARCH_TINY_tiny" / "search.json").write_text("{}")
    proc = subprocess.run(_search_cli(tmp_path, "search.trials=1"), env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "holds a search already; pass resume=true" in proc.stderr


def test_resume_with_no_search_to_resume_says_so_in_one_line_and_starts_a_new_search(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="fedcore_adapter.search"):
        result = run_search({**config(tmp_path, trials=1), "resume": True})
    lines = [r.getMessage() for r in caplog.records if "nothing to resume" in r.getMessage()]
    assert lines == [f"resume=true: nothing to resume under {result.folder} (no search there); starting a new search"]
    assert len(_csv(result.folder / "trials.csv")) == 1
