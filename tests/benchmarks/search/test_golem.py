"""The GOLEM benchmark's objective (benchmarks/search/golem.py, ``Evaluations``; no GOLEM needed): GOLEM's
evaluation threads get trials of the package's search, each candidate run once, none past the budget."""
from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks.search import golem_chain
from benchmarks.search.golem import Evaluations
from fedcore_adapter.search.driver import run_search
from tests.search.helpers import config


def _chain(ratio):
    return [{"name": "pruning#1", "params": {"pruning#1.pruning_ratio": ratio, "pruning#1.importance": "lamp"}}]


def test_each_candidate_runs_once_as_a_trial_and_nothing_runs_past_the_budget(tmp_path):
    got = {}

    def loop(search, pool):
        evaluations = Evaluations(search, pool)
        with ThreadPoolExecutor(2) as threads:  # as GOLEM's n_jobs: the same candidate from two threads at once
            same = [threads.submit(evaluations.fitness, _chain(0.3), True) for _ in range(2)]
            got["same"] = [f.result() for f in same]
        got["other"] = evaluations.fitness(_chain(0.6), True)
        got["again"] = evaluations.fitness(_chain(0.3))  # a known candidate: its row again, no trial
        with pytest.raises(ValueError, match="past the budget"):
            evaluations.fitness(_chain(0.8), True)
        got["spent"], got["asked"] = evaluations.spent(), evaluations.asked

    result = run_search(config(tmp_path, trials=2, max_accuracy_drop=0.5), loop=loop)
    with open(result.folder / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["param:pruning#1.pruning_ratio"]) for r in rows] == [0.3, 0.6]
    assert got["spent"] and got["asked"] == 4
    assert got["same"][0] == got["same"][1] == got["again"]
    for row, fitness in zip(result.trials, (got["same"][0], got["other"])):
        assert fitness == golem_chain.fitness(row, 0.5)
        assert fitness[1] == -row["val_accuracy"]
