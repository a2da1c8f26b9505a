"""pareto.png's reference points (the uncompressed model, the named setups' runs) are on the split the trials
are selected on; ``reference_points.csv`` holds them with both splits."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from fedcore_adapter.building import run_from_config
from fedcore_adapter.checkpoint import load_model
from fedcore_adapter.distributed.pool import DaskPool
from fedcore_adapter.metrics import evaluate
from fedcore_adapter.search import driver
from fedcore_adapter.search.driver import run_search
from fedcore_adapter.search.report import figure_points
from tests.conftest import TinyDataModule, tiny_mlp
from tests.search.helpers import DATA, MODEL, SETUP, config
from tests.servers import dask_scheduler


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A named setup's run (NAMED), a copy of it whose checkpoint is gone (NO_CKPT), and a 2-trial search
    given both as reference runs; what pareto.png was handed is captured."""
    tmp = tmp_path_factory.mktemp("search")
    named = run_from_config({"setup": {**SETUP, "name": "NAMED"}, "model": MODEL, "data": DATA,
                             "tracking": {"name": "none"}, "output_dir": str(tmp / "named")}).output_dir
    gone = tmp / "named" / "NO_CKPT"
    shutil.copytree(named, gone)
    shutil.rmtree(gone / "final")
    drawn = []

    def capture(path, trials, front, objectives, references, *args):
        drawn.extend(references)
        return plot_front(path, trials, front, objectives, references, *args)

    plot_front = driver.plot_front
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driver, "plot_front", capture)
        result = run_search(config(tmp, trials=2, reference_runs=[str(named), str(gone)]))
    with open(result.folder / "reference_points.csv") as f:
        rows = {r["setup"]: r for r in csv.DictReader(f)}
    return {"result": result, "named": named, "rows": rows, "drawn": {p["setup"]: p for p in drawn}}


def _validation_accuracy(folder) -> float:
    model = load_model(folder / "final", tiny_mlp())
    return evaluate(model, TinyDataModule().val_dataloader(), torch.nn.CrossEntropyLoss(), torch.device("cpu"))[
        "accuracy"]


def test_the_named_setups_points_are_their_validation_accuracy_like_the_trials(searched):
    row, point = searched["rows"]["NAMED"], searched["drawn"]["NAMED"]
    val = _validation_accuracy(searched["named"])
    test = float(row["accuracy"])
    assert val != test  # the two splits differ here, so the figure tells which one is drawn
    assert float(row["val_accuracy"]) == pytest.approx(val)
    assert row["plotted_split"] == "validation" and not row["val_note"]
    assert (point["y"], point["split"]) == (pytest.approx(val), "validation")
    assert point["x"] == float(row["params"])  # objectives [params, accuracy]


def test_the_uncompressed_point_is_the_searchs_reference_on_validation(searched):
    ref = searched["result"].reference
    row, point = searched["rows"]["uncompressed"], searched["drawn"]["uncompressed"]
    assert float(row["val_accuracy"]) == ref["val_accuracy"] and float(row["accuracy"]) == ref["row"]["accuracy"]
    assert (point["y"], point["split"]) == (ref["val_accuracy"], "validation")


def test_a_named_setup_without_a_validation_figure_is_drawn_marked_as_test_split(searched):
    row, point = searched["rows"]["NO_CKPT"], searched["drawn"]["NO_CKPT"]
    assert row["val_accuracy"] == "" and "not measured" in row["val_note"] and "no checkpoint" in row["val_note"]
    assert row["plotted_split"] == "test"
    assert (point["y"], point["split"]) == (float(row["accuracy"]), "test")


def test_selected_on_test_every_point_is_the_test_figure_and_none_is_marked():
    rows = [{"setup": "uncompressed", "params": 10, "val_accuracy": None, "accuracy": 0.9},
            {"setup": "A", "params": 5, "val_accuracy": 0.7, "accuracy": 0.8}]
    assert figure_points(rows, ["params", "accuracy"], "test") == [
        {"setup": "uncompressed", "x": 10, "y": 0.9, "split": "test"},
        {"setup": "A", "x": 5, "y": 0.8, "split": "test"}]
    assert figure_points(rows, ["params", "accuracy"], "validation") == [
        {"setup": "uncompressed", "x": 10, "y": 0.9, "split": "test"},
        {"setup": "A", "x": 5, "y": 0.7, "split": "validation"}]


@pytest.fixture
def scheduler(tmp_path):
    home = tmp_path / "dask"
    home.mkdir()
    yield from dask_scheduler(home)


def test_on_dask_the_named_runs_are_measured_by_one_run_while_trials_run_side_by_side(tmp_path, scheduler,
                                                                                        monkeypatch):
    """No shared prefix: both trials are in flight at once on the two workers; one of them is asked to measure
    the named setup's run on the validation split, not both."""
    named = run_from_config({"setup": {**SETUP, "name": "NAMED"}, "model": MODEL, "data": DATA,
                             "tracking": {"name": "none"}, "output_dir": str(tmp_path / "named")}).output_dir
    asked = []
    submit = DaskPool.submit

    def counted(self, key, payload):
        asked.append((key, payload.get("references")))
        return submit(self, key, payload)

    monkeypatch.setattr(DaskPool, "submit", counted)
    cfg = config(tmp_path, trials=2, prefix=0, reference_runs=[str(named)])
    cfg["cluster"] = {"name": "remote", "address": scheduler[0], "wait_for_workers": 2, "timeout": 60}
    result = run_search(cfg)
    assert len(asked) == 2  # both trials, submitted before either finished
    measuring = [key for key, refs in asked if refs]
    assert len(measuring) == 1 and dict(asked)[measuring[0]] == [str(named.absolute())]
    point = json.loads((result.folder / "search.json").read_text())["reference_points"][str(named.absolute())]
    assert point["measured_by"] == f"trial_{measuring[0]:04d}"
    with open(result.folder / "reference_points.csv") as f:
        row, = [r for r in csv.DictReader(f) if r["setup"] == "NAMED"]
    assert float(row["val_accuracy"]) == pytest.approx(_validation_accuracy(named)) and not row["val_note"]


def test_a_trials_params_are_written_as_the_grid_points_its_nodes_ran_with():
    """Optuna's stepped floats come back as 0.45000000000000007; trials.csv shows the value the node ran with."""
    from fedcore_adapter.search.report import trial_row

    row = trial_row(3, "complete", {"chain": "pruning#1"}, {"pruning#1.pruning_ratio": 0.45000000000000007,
                                                             "pruning#1.importance": "lamp", "chain": "pruning#1"}, {})
    assert row["param:pruning#1.pruning_ratio"] == 0.45 and repr(row["param:pruning#1.pruning_ratio"]) == "0.45"
    assert row["param:pruning#1.importance"] == "lamp" and row["param:chain"] == "pruning#1"
