"""Recovery after compression: pruning and low-rank fine-tunes receive the model as it entered the node; pruning
iterations follow a ratio schedule."""
import json

import pytest
import torch

import fedcore_adapter.nodes.low_rank.node as low_rank_node
import fedcore_adapter.nodes.pruning.node as pruning_node
import fedcore_adapter.nodes.pruning.unstructured as unstructured_node
from fedcore_adapter import run_setup
from fedcore_adapter import trainer
from tests.conftest import TinyDataModule, tiny_mlp, tiny_setup
from tests.nodes.test_low_rank import low_rank_mlp


def _spy(monkeypatch, module):
    """Record (tag, outputs of node_input on a fixed batch, recovery) for every fine-tune the node starts."""
    calls, x = [], torch.randn(8, 8)

    def spy(model, ctx, params, **kwargs):
        node_input = kwargs.get("node_input")
        with torch.no_grad():
            calls.append((kwargs.get("tag"), None if node_input is None else node_input(x).clone(),
                          kwargs.get("recovery", False) or node_input is not None))
        return trainer.train(model, ctx, params, **kwargs)

    monkeypatch.setattr(module, "train", spy)
    return calls, x


def test_every_pruning_finetune_gets_the_unpruned_node_input(monkeypatch, tmp_path):
    calls, x = _spy(monkeypatch, pruning_node)
    model = tiny_mlp()
    node = {"kind": "pruning", "pruning_ratio": 0.5, "pruning_iterations": 2, "epochs": 1,
            "finetune_params": {"epochs": 1}}
    run_setup(tiny_setup(node, measure=False), model, TinyDataModule(), output_dir=tmp_path)
    assert [tag for tag, *_ in calls] == ["finetune_1", "finetune_2"]
    assert all(torch.equal(out, model(x)) for _, out, _ in calls)


def test_unstructured_pruning_finetunes_get_the_node_input_too(monkeypatch, tmp_path):
    calls, x = _spy(monkeypatch, unstructured_node)
    model = tiny_mlp()
    node = {"kind": "unstructured_pruning", "sparsity": 0.5, "finetune_params": {"epochs": 1}}
    run_setup(tiny_setup(node, measure=False), model, TinyDataModule(), output_dir=tmp_path)
    assert len(calls) == 1 and torch.equal(calls[0][1], model(x))


def test_the_low_rank_finetune_gets_the_unfactorised_node_input(monkeypatch, tmp_path):
    calls, x = _spy(monkeypatch, low_rank_node)
    model = low_rank_mlp()
    node = {"kind": "low_rank", "thresholds": [0.5], "finetune_params": {"epochs": 1, "distill": True}}
    result = run_setup(tiny_setup(node, measure=False), model, TinyDataModule(), output_dir=tmp_path)
    finetunes = [out for tag, out, _ in calls if tag == "finetune"]
    assert len(finetunes) == 1 and torch.equal(finetunes[0], model(x))
    assert not torch.allclose(result.model(x), model(x))  # the node did change the model


def test_low_rank_copies_its_input_only_to_distil_but_its_finetune_is_a_recovery_finetune_anyway(monkeypatch,
                                                                                                 tmp_path):
    calls, _ = _spy(monkeypatch, low_rank_node)
    node = {"kind": "low_rank", "thresholds": [0.5], "finetune_params": {"epochs": 1}}  # distill off by default
    run_setup(tiny_setup(node, measure=False), low_rank_mlp(), TinyDataModule(), output_dir=tmp_path)
    assert [(tag, out, recovery) for tag, out, recovery in calls if tag == "finetune"] == [("finetune", None, True)]


def test_the_geometric_schedule_cuts_the_same_fraction_of_what_remains_each_step():
    from fedcore_adapter.nodes.pruning.structured import scheduled_ratio

    kept = [1 - scheduled_ratio("geometric", 0.75, s, 2) for s in range(3)]
    assert kept == pytest.approx([1.0, 0.5, 0.25])  # each step halves the channels
    assert [scheduled_ratio("linear", 0.75, s, 3) for s in range(4)] == pytest.approx([0, 0.25, 0.5, 0.75])


@pytest.mark.parametrize("schedule, channels", [("linear", [16, 10, 4]), ("geometric", [16, 8, 4])])
def test_pruning_iterations_follow_the_schedule_and_end_at_the_same_ratio(tmp_path, schedule, channels):
    from tests.nodes.test_pruning import ConvDataModule, res_conv, setup

    node = {"kind": "pruning", "pruning_ratio": 0.75, "pruning_iterations": 2, "schedule": schedule}
    result = run_setup(setup(node, measure=False), res_conv(width=16), ConvDataModule(), output_dir=tmp_path)
    ops = json.loads((result.output_dir / "final" / "manifest.json").read_text())["transforms"][0]["data"]["ops"]
    removed = [len(op["idxs"]) for op in ops if op["module"] == "stem.0"]
    assert [16, 16 - removed[0], 16 - sum(removed)] == channels
