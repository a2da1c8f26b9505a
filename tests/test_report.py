"""The comparison report: results folders in, CSV + Markdown + accuracy-vs-size/latency plot out."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from fedcore_adapter import run_setup
from fedcore_adapter.errors import ConfigError
from fedcore_adapter.plots import comparison_figure, plot_nodes
from fedcore_adapter.report import comparison_rows, main, runs_from_folders
from tests.conftest import TinyDataModule, tiny_mlp, tiny_setup

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A RAW run and a two-node run of the same model, plus an unfinished copy of the latter."""
    root = tmp_path_factory.mktemp("results")
    raw = run_setup(tiny_setup({"kind": "training", "epochs": 2, "progress": False}, name="RAW"), tiny_mlp(),
                    TinyDataModule(), output_dir=root)
    two = run_setup(tiny_setup({"kind": "training", "epochs": 1, "progress": False},
                               {"kind": "distillation", "epochs": 1, "progress": False}, name="TWO"),
                    tiny_mlp(), TinyDataModule(), output_dir=root)
    shutil.copytree(two.output_dir, root / "LATE.partial")
    return {"root": root, "RAW": raw.metrics, "TWO": two.metrics}


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_compare_writes_csv_markdown_and_plot_with_the_input_baseline_first(results, tmp_path, capsys):
    assert main([str(results["root"]), "--out", str(tmp_path)]) == 0
    rows = _csv(tmp_path / "comparison.csv")
    assert [(r["setup"], r["baseline"]) for r in rows] == [("input", "input"), ("RAW", "RAW"), ("TWO", "")]
    base, two = results["TWO"][0], results["TWO"][-1]
    assert float(rows[0]["accuracy"]) == pytest.approx(base["accuracy"]) and int(rows[0]["params"]) == base["params"]
    assert float(rows[2]["accuracy"]) == pytest.approx(two["accuracy"])
    assert rows[2]["chain"] == "training -> distillation"
    assert float(rows[2]["size_mb_ratio"]) == pytest.approx(two["size_mb"] / base["size_mb"])
    assert float(rows[2]["speedup"]) == pytest.approx(base["latency_ms"] / two["latency_ms"])
    assert float(rows[2]["accuracy_delta_pt"]) == pytest.approx(100 * (two["accuracy"] - base["accuracy"]))  # points
    assert float(rows[2]["loss_delta"]) == pytest.approx(two["loss"] - base["loss"])
    assert float(rows[0]["accuracy_delta_pt"]) == 0.0  # the input model against itself
    markdown = (tmp_path / "comparison.md").read_text()
    assert "| run | setup | baseline | chain | runtime |" in markdown
    assert "| RAW | RAW | RAW | training | torch |" in markdown
    assert (tmp_path / "comparison.png").read_bytes().startswith(PNG)
    assert markdown in capsys.readouterr().out


def test_plot_marks_the_input_model_and_the_raw_run(results):
    runs = runs_from_folders([results["root"]])
    fig = comparison_figure(comparison_rows(runs))
    size_axis = fig.axes[0]
    raw = results["RAW"][-1]
    assert [line.get_ydata()[0] for line in size_axis.lines] == [pytest.approx(raw["accuracy"])]  # RAW's dashed line
    labels = [t.get_text() for t in size_axis.texts]
    assert labels == ["input (baseline)", "RAW", "TWO"]


def test_unfinished_folders_are_left_out_unless_asked(results):
    def folders(**kw):
        return sorted(Path(r["source"]).name for r in runs_from_folders([results["root"]], **kw))

    assert folders() == ["RAW", "TWO"]
    assert folders(include_partial=True) == ["LATE.partial", "RAW", "TWO"]


def test_node_plot_is_a_png_even_when_a_metric_was_not_measured(results, tmp_path):
    rows = [dict(r, accuracy=None) for r in results["TWO"]]
    assert plot_nodes(rows, tmp_path / "nodes.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("argv, message", [
    ([], "compare: give results folders (e.g. composition_results) or --tracking-uri URI [--experiment NAME]"),
    (["no/such/folder"], "compare: 'no/such/folder' is not a folder (give results folders, e.g. composition_results)"),
])
def test_bad_compare_arguments_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as err:
        main(argv)
    assert str(err.value) == message


def test_a_missing_local_tracking_store_is_one_line_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        main(["--tracking-uri", f"sqlite:///{tmp_path}/none.db", "--out", str(tmp_path)])
    assert str(err.value).startswith(f"no tracking store at sqlite:///{tmp_path}/none.db")
    assert not (tmp_path / "none.db").exists()


def test_folders_without_finished_runs_are_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="^compare: no runs found"):
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")])


def test_a_results_folder_reads_its_status_setup_and_rows(results):
    [run] = [r for r in runs_from_folders([results["root"] / "RAW"])]
    assert (run["setup"], run["status"], run["run_name"]) == ("RAW", "completed", "RAW")
    assert run["rows"] == json.loads((results["root"] / "RAW" / "metrics.json").read_text())


def test_runs_of_the_same_name_are_told_apart_by_seed_else_by_folder(tmp_path):
    setup = tiny_setup({"kind": "training", "epochs": 1, "progress": False}, name="RAW")
    for job, seed in (("0", 0), ("1", 1)):
        run_setup(setup, tiny_mlp(), TinyDataModule(), output_dir=tmp_path / "sweep" / job,
                  overrides={"common": {"seed": seed}})
    assert sorted(r["run_name"] for r in runs_from_folders([tmp_path / "sweep"])) == ["RAW seed=0", "RAW seed=1"]
    nested = tmp_path / "composition_results" / "sweeps" / "2026-01-01_00-00-00"  # where a sweep's jobs write
    shutil.copytree(tmp_path / "sweep", nested)
    assert len(runs_from_folders([tmp_path / "composition_results"])) == 2  # found from the output folder too
    shutil.rmtree(tmp_path / "composition_results")
    shutil.copytree(tmp_path / "sweep" / "0", tmp_path / "sweep" / "2")  # the same seed twice: the folders
    names = sorted(r["run_name"] for r in runs_from_folders([tmp_path / "sweep"]))
    assert names == ["RAW (0/RAW)", "RAW (1/RAW)", "RAW (2/RAW)"]
