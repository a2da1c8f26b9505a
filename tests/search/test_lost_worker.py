"""A trial whose Dask worker dies is asked again with the same parameters (a real scheduler and two worker
processes on 127.0.0.1; the scheduler gives up on a task at its first lost worker, so the search sees it)."""
from __future__ import annotations

import csv
import optuna
import pytest

from fedcore_adapter.search.driver import run_search
from fedcore_adapter.search.trial import open_storage
from tests.search.helpers import config
from tests.servers import dask_scheduler


@pytest.fixture
def scheduler(tmp_path, monkeypatch):
    """A scheduler that gives up on a task at its first lost worker (so the search, not Dask, re-runs it)."""
    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES", "0")
    home = tmp_path / "dask"
    home.mkdir()
    yield from dask_scheduler(home)


def test_a_trial_whose_worker_died_is_run_again_with_the_same_parameters(tmp_path, scheduler):
    address, _, _ = scheduler
    marker = tmp_path / "died"
    cfg = config(tmp_path, trials=2, prefix=0)
    cfg["model"] = {"_target_": "tests.search.helpers.die_once", "marker": str(marker)}
    cfg["cluster"] = {"name": "remote", "address": address, "wait_for_workers": 2, "timeout": 60}
    result = run_search(cfg)
    assert marker.exists()  # one worker process ended itself in its first trial
    study = optuna.load_study(study_name="search", storage=open_storage(result.folder / "study.journal"))
    lost = [t for t in study.trials if t.user_attrs.get("lost")]
    assert len(lost) == 1 and lost[0].state == optuna.trial.TrialState.FAIL
    rerun = [t for t in study.trials if t.user_attrs.get("rerun_of") == lost[0].number]
    assert len(rerun) == 1 and rerun[0].params == lost[0].params
    assert rerun[0].state == optuna.trial.TrialState.COMPLETE
    with open(result.folder / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["state"] for r in rows} == {"complete"}  # the lost try is not a finished trial
