"""Per-layer sensitivity: one independent, picklable measurement per (layer group, ratio)."""
import json
import pickle

import pytest
import torch

from fedcore_adapter import run_setup
from fedcore_adapter.nodes.pruning import pruning_sensitivity
from tests.nodes.test_pruning import ConvDataModule, res_conv, setup


class PicklingExecutor:
    """Runs every task as a cluster would: the function and its item go through pickle first."""

    def __init__(self):
        self.items = []

    def map(self, fn, items):
        out = []
        for item in items:
            fn_copy, item_copy = pickle.loads(pickle.dumps((fn, item)))
            self.items.append(item_copy)
            out.append(fn_copy(item_copy))
        return out


def test_one_row_per_group_and_ratio_each_run_as_an_independent_picklable_task():
    model = res_conv()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    executor = PicklingExecutor()
    rows = pruning_sensitivity(model, ConvDataModule().val_dataloader(), [0.25, 0.75], limit_batches=2,
                               executor=executor)
    groups = ["head.1", "block.0", "block.3"]
    assert sorted({r["layer"] for r in rows}) == sorted(groups)
    assert executor.items == [(r["layer"], r["ratio"]) for r in rows] and len(rows) == 6
    for row in rows:
        assert row["metric"] == "accuracy" and row["baseline"] == rows[0]["baseline"]
        assert row["drop"] == pytest.approx(row["baseline"] - row["value"])
        assert row["params_removed"] > 0
    removed = {(r["layer"], r["ratio"]): r["params_removed"] for r in rows}
    assert all(removed[(g, 0.75)] > removed[(g, 0.25)] for g in groups)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # each task prunes its own copy


def test_output_mse_grows_with_the_ratio_on_unlabeled_data():
    batches = [torch.randn(16, 1, 16) for _ in range(2)]
    rows = pruning_sensitivity(res_conv(), batches, [0.25, 0.75], layers=["block.0"])
    assert [r["metric"] for r in rows] == ["output_mse", "output_mse"]
    assert 0 < rows[0]["drop"] < rows[1]["drop"]


def test_a_ratio_too_high_for_a_group_is_reported_on_its_row_not_raised():
    rows = pruning_sensitivity(res_conv(), ConvDataModule().val_dataloader(), [0.95], layers=["block.3"],
                               limit_batches=1)
    assert rows[0]["value"] is None and "would remove every channel of layer 'block.3'" in rows[0]["error"]


def test_unknown_layer_group_lists_the_prunable_ones():
    with pytest.raises(ValueError, match=r"unknown layer group\(s\) \['nope'\]; prunable groups: head\.1"):
        pruning_sensitivity(res_conv(), ConvDataModule().val_dataloader(), [0.5], layers=["nope"])


def test_the_node_measures_sensitivity_through_the_run_executor(tmp_path):
    executor = PicklingExecutor()
    result = run_setup(setup({"kind": "pruning", "pruning_ratio": 0.5, "sensitivity_ratios": [0.5]}, measure=False,
                             limit_valid_batches=1), res_conv(), ConvDataModule(), output_dir=tmp_path,
                       executor=executor)
    rows = json.loads((result.output_dir / "final" / "sensitivity.json").read_text())
    assert {r["layer"] for r in rows} == {"head.1", "block.0", "block.3"} and len(executor.items) == 3
