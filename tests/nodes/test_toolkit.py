"""The node toolkit: calibration inputs, temporary hooks, the per-layer loop, fine-tune inheritance."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcore_adapter.context import NodeContext
from fedcore_adapter.errors import NodeError
from fedcore_adapter.nodes.low_rank import LowRankConfig
from fedcore_adapter.nodes.pruning import PruningConfig
from fedcore_adapter.nodes.toolkit import (calibration_inputs, calibration_limit, evaluating, forward_hooks,
                                           inherit_finetune, per_layer, write_report)
from fedcore_adapter.schema import CommonConfig
from tests.conftest import tiny_mlp


def _ctx(tmp_path, train=None, val=None, **common) -> NodeContext:
    return NodeContext(train_loader=train, val_loader=val, test_loader=None, loss_fn=None, device=torch.device("cpu"),
                       teacher=nn.Identity(), output_dir=tmp_path / "node", common=CommonConfig(**common),
                       node_label="node 1:low_rank")


def _loader(n: int, value: float = 0.0) -> DataLoader:
    return DataLoader(TensorDataset(torch.full((n, 8), value), torch.zeros(n, dtype=torch.long)), batch_size=4)


def test_calibration_inputs_are_validation_inputs_without_targets(tmp_path):
    ctx = _ctx(tmp_path, train=_loader(16, 1.0), val=_loader(16, 2.0))
    inputs = calibration_inputs(ctx, 3)
    assert len(inputs) == 3 and all(torch.equal(x, torch.full((4, 8), 2.0)) for x in inputs)


def test_calibration_inputs_fall_back_to_training_batches_when_validation_yields_none(tmp_path):
    ctx = _ctx(tmp_path, train=_loader(8, 1.0), val=_loader(0))
    assert [float(x[0, 0]) for x in calibration_inputs(ctx, None)] == [1.0, 1.0]


def test_calibration_inputs_without_any_batch_is_one_line_naming_node_and_purpose(tmp_path):
    with pytest.raises(NodeError, match=r"node 1:low_rank: smoothing needs calibration data, but the data module's "
                                        r"val_dataloader\(\) and train_dataloader\(\) yielded no batches"):
        calibration_inputs(_ctx(tmp_path, train=_loader(0), val=None), 4, purpose="smoothing")


@pytest.mark.parametrize("override, common, default, expected", [
    (3, {"limit_valid_batches": 5}, 8, 3), (None, {"limit_valid_batches": 5}, 8, 5), (None, {}, 8, 8),
    (None, {}, None, None)])
def test_calibration_limit_is_override_then_setup_then_default(tmp_path, override, common, default, expected):
    assert calibration_limit(_ctx(tmp_path, **common), override, default) == expected


def test_forward_hooks_run_inside_the_block_only_and_are_removed_on_error():
    model = tiny_mlp()
    seen = []
    with forward_hooks(model, {"0": lambda m, a, out: seen.append(("out", tuple(out.shape)))},
                       pre={model[2]: lambda m, args: seen.append(("in", tuple(args[0].shape)))}):
        model(torch.zeros(2, 8))
    assert seen == [("out", (2, 32)), ("in", (2, 32))]
    with pytest.raises(RuntimeError, match="boom"):
        with forward_hooks(model, {"0": lambda m, a, out: seen.append("again")}):
            raise RuntimeError("boom")
    model(torch.zeros(2, 8))
    assert seen[-1] == ("in", (2, 32)) and len(seen) == 2
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_evaluating_restores_each_models_training_flag():
    a, b = tiny_mlp().train(), tiny_mlp().eval()
    with evaluating(a, b):
        assert not a.training and not b.training
    assert a.training and not b.training


class _Recorder:
    def __init__(self):
        self.calls = []

    def map(self, fn, items):
        self.calls.append(list(items))
        return [fn(i) for i in items]


class _Job:
    def __init__(self, name):
        self.name = name


def test_per_layer_keys_results_by_job_name_and_runs_every_job_through_the_executor():
    executor = _Recorder()
    results = per_layer(executor, lambda job: len(job.name), [_Job("a"), _Job("bb")])
    assert results == {"a": 1, "bb": 2} and len(executor.calls) == 1
    assert per_layer(None, lambda item: item[1] * 2, [("g", 0.5), ("g", 0.25)]) == {("g", 0.5): 1.0,
                                                                                    ("g", 0.25): 0.5}


def test_inherit_finetune_takes_the_nodes_learning_rate_unless_given():
    assert inherit_finetune({"learning_rate": 0.01, "finetune_params": {"epochs": 2, "custom_loss": None}}) == \
        {"learning_rate": 0.01, "finetune_params": {"epochs": 2, "learning_rate": 0.01}}
    assert inherit_finetune({"learning_rate": 0.01, "finetune_params": {"learning_rate": 0.5}})[
        "finetune_params"] == {"learning_rate": 0.5}
    assert inherit_finetune({"learning_rate": 0.01}) == {"learning_rate": 0.01}


@pytest.mark.parametrize("config", [PruningConfig, LowRankConfig])
def test_pruning_and_low_rank_finetunes_inherit_the_node_learning_rate(config):
    node = config.model_validate({"learning_rate": 0.02, "finetune_params": {"epochs": 1}})
    assert node.finetune_params.learning_rate == 0.02


def test_write_report_writes_json_into_the_node_folder(tmp_path):
    ctx = _ctx(tmp_path)
    write_report(ctx, "sensitivity.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "node" / "sensitivity.json").read_text()) == {"a": [1, 2]}
