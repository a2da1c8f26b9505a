"""Trials are selected on the validation split; the test split stays the held-out figure."""
from __future__ import annotations

import csv
import json
import logging

import pytest

from fedcore_adapter.errors import ConfigError
from fedcore_adapter.search.driver import run_search
from tests.search.helpers import config

NO_VAL = {"_target_": "tests.search.helpers.build_tiny_data_no_val"}


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_trial_whose_test_accuracy_meets_the_line_but_validation_does_not_is_infeasible(tmp_path):
    result = run_search(config(tmp_path, trials=3, max_accuracy_drop=0.05,
                               space={"pruning": {"pruning_ratio": {"low": 0.2, "high": 0.8}, "reconstruct": False}}))
    ref = result.reference
    rows = _rows(result.folder / "trials.csv")
    test_meets_val_misses = [r for r in rows if ref["row"]["accuracy"] - float(r["accuracy"]) <= 0.05
                             and ref["val_accuracy"] - float(r["val_accuracy"]) > 0.05]
    assert test_meets_val_misses  # the tiny problem gives such a trial (seed 0)
    assert all(r["feasible"] == "False" for r in test_meets_val_misses)
    assert not {r["trial"] for r in test_meets_val_misses} & {r["trial"] for r in _rows(result.folder / "pareto.csv")}
    assert json.loads((result.folder / "search.json").read_text())["selection"] == "validation"


def test_trials_and_pareto_csv_carry_the_validation_and_the_test_accuracy(tmp_path):
    result = run_search(config(tmp_path, trials=2))
    for name in ("trials.csv", "pareto.csv"):
        with open(result.folder / name) as f:
            header = next(csv.reader(f))
        assert {"val_accuracy", "val_accuracy_drop_pt", "accuracy", "accuracy_drop_pt"} <= set(header)
    for r in _rows(result.folder / "trials.csv"):
        last = json.loads((result.folder / "trials" / f"trial_{int(r['trial']):04d}" / "metrics.json").read_text())[-1]
        assert float(r["accuracy"]) == last["accuracy"]  # the test split, as the run measured it
        assert 0 <= float(r["val_accuracy"]) <= 1
        assert float(r["val_accuracy_drop_pt"]) == (result.reference["val_accuracy"] - float(r["val_accuracy"])) * 100


def test_without_a_validation_loader_the_search_says_so_once_and_selects_on_test(tmp_path, caplog):
    cfg = config(tmp_path, trials=2, max_accuracy_drop=0.05)
    cfg["data"] = dict(NO_VAL)
    with caplog.at_level(logging.WARNING, logger="fedcore_adapter.search"):
        result = run_search(cfg)
    warnings = [r for r in caplog.records if "no val_dataloader()" in r.getMessage()]
    assert len(warnings) == 1 and "test split" in warnings[0].getMessage()
    state = json.loads((result.folder / "search.json").read_text())
    assert state["selection"] == "test" and "no val_dataloader()" in state["selection_note"]
    ref = result.reference["row"]["accuracy"]
    for r in _rows(result.folder / "trials.csv"):
        assert r["val_accuracy"] == ""
        assert r["feasible"] == str(ref - float(r["accuracy"]) <= 0.05 + 1e-12)


def test_without_a_shared_prefix_the_input_models_validation_accuracy_sets_the_line(tmp_path):
    from fedcore_adapter.metrics import evaluate
    from tests.helpers import build_tiny_data, build_tiny_mlp

    cfg = config(tmp_path, trials=2, max_accuracy_drop=0.05, moves={"drop": False, "reorder": False, "insert": []})
    cfg["setup"] = {**cfg["setup"], "nodes": cfg["setup"]["nodes"][1:]}  # pruning only: no training prefix
    result = run_search(cfg)
    import torch

    expected = evaluate(build_tiny_mlp(), build_tiny_data().val_dataloader(), torch.nn.functional.cross_entropy,
                        torch.device("cpu"))["accuracy"]
    assert result.reference["val_accuracy"] == expected
    for r in _rows(result.folder / "trials.csv"):
        assert int(r["start_node"]) == 0
        assert r["feasible"] == str(expected - float(r["val_accuracy"]) <= 0.05 + 1e-12)


def test_a_validation_split_too_small_for_the_constraint_is_said_once_with_the_size_that_would_do(tmp_path, caplog):
    """32 validation samples: an accuracy near 0.9 has a standard error of about 5 pt, so a 5-point constraint
    is inside the noise (warned, in search.json); a 50-point one is not (nothing said)."""
    with caplog.at_level(logging.WARNING, logger="fedcore_adapter"):
        result = run_search(config(tmp_path / "tight", trials=1, max_accuracy_drop=0.05, early_stop={"enabled": True}))
    state = json.loads((result.folder / "search.json").read_text())
    p, n = result.reference["val_accuracy"], state["val_samples"]
    assert n == 32 and 0 < p < 1
    assert abs(state["val_standard_error"] - (p * (1 - p) / n) ** 0.5) < 1e-12
    warned = [r.getMessage() for r in caplog.records if "the validation split has 32 samples" in r.getMessage()]
    assert len(warned) == 1 and warned[0] == state["val_note"] and "\n" not in warned[0]
    assert "of the constraint (5 pt)" in warned[0] and "samples brings it under half the constraint" in warned[0]
    # early stopping's margin below the line (auto): twice that standard error, kept beside it
    assert abs(state["early_stop_margin"] - 2 * state["val_standard_error"]) < 1e-12

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedcore_adapter"):
        loose = run_search(config(tmp_path / "loose", trials=1, max_accuracy_drop=0.5))
    assert "val_note" not in json.loads((loose.folder / "search.json").read_text())
    assert not [r for r in caplog.records if "validation split has" in r.getMessage()]


ENCODER = {"model": {"_target_": "tests.conftest.TinyEncoder"}, "data": {"_target_": "tests.conftest.TokenDataModule"},
           "setup": {"name": "ENC", "common": {"latency_repeats": 2, "latency_warmup": 1},
                     "nodes": [{"kind": "training", "epochs": 1},
                               {"kind": "low_rank", "method": {"name": "svd", "thresholds": [0.5], "epochs": 0}}]}}


def test_an_unlabeled_encoders_search_names_cosine_its_quality_in_one_line_at_its_reference(tmp_path):
    with pytest.raises(ConfigError) as err:
        run_search({**config(tmp_path, trials=2), **ENCODER})
    message = str(err.value)
    assert "\n" not in message and message.startswith("search.quality = 'accuracy': the model reports no accuracy")
    assert "it reports cosine: set search.quality to one of them" in message
    assert not (tmp_path / "out" / "SEARCH_ENC_tiny" / "trials").exists()


def test_an_unlabeled_encoder_is_searched_within_a_cosine_drop_of_its_reference(tmp_path):
    """``search.quality=cosine``: each trial's validation cosine to the search's input model is the constraint's
    figure and an objective; the reference (the shared training, a distillation from that model) is at ~1."""
    result = run_search({**config(tmp_path, trials=3, quality="cosine", objectives=["params", "cosine"],
                                  max_accuracy_drop=0.2), **ENCODER})
    line = result.reference["val_cosine"] - 0.2
    assert result.reference["val_cosine"] == pytest.approx(1.0, abs=1e-4)
    rows = _rows(result.folder / "trials.csv")
    assert [r["state"] for r in rows] == ["complete"] * 3
    for r in rows:
        trial = result.study.trials[int(r["trial"])]
        assert trial.values == [float(r["params"]), float(r["val_cosine"])]
        assert r["feasible"] == str(float(r["val_cosine"]) >= line) and 0 < float(r["cosine"]) <= 1
    assert len({r["val_cosine"] for r in rows}) > 1  # the thresholds drawn move the outputs differently
