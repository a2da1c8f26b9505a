"""Every objective has its columns in trials.csv / pareto.csv: for accuracy and loss, the validation figure the
trials are selected on (``val_<name>``) and the held-out test figure (``<name>``); pareto.png draws loss, like
accuracy, on the split selected on."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
import torch
from matplotlib.axes import Axes

from fedcore_adapter.checkpoint import load_model
from fedcore_adapter.metrics import evaluate
from fedcore_adapter.search.config import OBJECTIVES
from fedcore_adapter.search.driver import run_search
from fedcore_adapter.search.report import figure_points
from fedcore_adapter.search.trial import open_storage
from tests.conftest import TinyDataModule, tiny_mlp
from tests.search.helpers import config


def _read(path) -> tuple[list[str], list[dict]]:
    with open(path) as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A 2-trial search on objectives [macs, loss]; what pareto.png draws (Axes.scatter / plot / set_ylabel) is
    captured."""
    tmp = tmp_path_factory.mktemp("search")
    drawn = {"scatter": [], "plot": [], "ylabel": []}
    scatter, plot, ylabel = Axes.scatter, Axes.plot, Axes.set_ylabel

    def record(kind, original):
        def wrapper(self, *args, **kwargs):
            drawn[kind].append((kwargs.get("label"), *args))
            return original(self, *args, **kwargs)
        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Axes, "scatter", record("scatter", scatter))
        mp.setattr(Axes, "plot", record("plot", plot))
        mp.setattr(Axes, "set_ylabel", record("ylabel", ylabel))
        result = run_search(config(tmp, trials=2, objectives=["macs", "loss"]))
    study = optuna.load_study(study_name="search", storage=open_storage(result.folder / "study.journal"))
    return {"result": result, "drawn": drawn, "study": study,
            **{name: _read(result.folder / f"{name}.csv") for name in ("trials", "pareto", "reference_points")}}


@pytest.mark.parametrize("table", ["trials", "pareto", "reference_points"])
def test_every_allowed_objective_has_its_selected_on_and_its_held_out_column(searched, table):
    header = set(searched[table][0])
    for name in OBJECTIVES:
        assert name in header  # the test split's figure (or the split-free one: macs, latency_ms_per_sample...)
        if name in ("accuracy", "loss"):
            assert f"val_{name}" in header  # the validation figure the trials are selected on


def test_a_loss_objective_is_selected_on_val_loss_and_the_test_loss_is_held_out(searched):
    folder = searched["result"].folder
    rows = searched["trials"][1]
    assert [r["state"] for r in rows] == ["complete"] * 2
    for r in rows:
        trial = searched["study"].trials[int(r["trial"])]
        assert float(r["val_loss"]) == trial.values[1]  # what the study was told: the validation loss
        last = json.loads((folder / "trials" / f"trial_{int(r['trial']):04d}" / "metrics.json").read_text())[-1]
        assert float(r["loss"]) == last["loss"] and float(r["macs"]) == last["macs"] == trial.values[0]
        assert float(r["latency_ms_per_sample"]) == last["latency_ms_per_sample"]
    assert any(float(r["val_loss"]) != float(r["loss"]) for r in rows)  # the splits differ: the column tells which
    front = searched["pareto"][1]
    assert front and all(r["val_loss"] for r in front)


def test_pareto_png_draws_the_trials_and_the_front_on_val_loss(searched):
    drawn = searched["drawn"]
    (_, xs, ys), = [d for d in drawn["scatter"] if d[0] == "trials"]
    trials = sorted(searched["trials"][1], key=lambda r: int(r["trial"]))
    assert list(ys) == [float(r["val_loss"]) for r in trials] and list(xs) == [float(r["macs"]) for r in trials]
    (_, fx, fy, _), = [d for d in drawn["plot"] if d[0] == "Pareto front (feasible)"]
    front = sorted((float(r["macs"]), float(r["val_loss"])) for r in searched["pareto"][1])
    assert list(zip(fx, fy)) == front
    assert drawn["ylabel"][-1][1] == "loss (validation split)"


def test_the_uncompressed_point_is_its_validation_loss_in_reference_points_and_on_the_plot(searched):
    ref = searched["result"].reference
    model = load_model(Path(ref["output_dir"]) / "final", tiny_mlp())  # the shared prefix's model
    val_loss = evaluate(model, TinyDataModule().val_dataloader(), torch.nn.CrossEntropyLoss(),
                        torch.device("cpu"))["loss"]
    assert ref["val_loss"] == pytest.approx(val_loss)
    row, = [r for r in searched["reference_points"][1] if r["setup"] == "uncompressed"]
    assert float(row["val_loss"]) == ref["val_loss"] and float(row["loss"]) == ref["row"]["loss"]
    assert row["plotted_split"] == "validation"
    (_, x, y), = [d[:3] for d in searched["drawn"]["scatter"] if d[0] == "uncompressed"]
    assert (x, y) == ([ref["row"]["macs"]], [ref["val_loss"]])


def test_a_reference_point_without_a_validation_loss_is_drawn_as_its_test_loss_marked():
    rows = [{"setup": "uncompressed", "macs": 10, "val_loss": 0.4, "loss": 0.5},
            {"setup": "A", "macs": 5, "val_loss": None, "loss": 0.7}]
    assert figure_points(rows, ["macs", "loss"], "validation") == [
        {"setup": "uncompressed", "x": 10, "y": 0.4, "split": "validation"},
        {"setup": "A", "x": 5, "y": 0.7, "split": "test"}]
    assert figure_points(rows, ["macs", "loss"], "test") == [
        {"setup": "uncompressed", "x": 10, "y": 0.5, "split": "test"},
        {"setup": "A", "x": 5, "y": 0.7, "split": "test"}]
