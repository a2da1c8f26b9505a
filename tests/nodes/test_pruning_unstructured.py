"""The ``unstructured_pruning`` node: schedules, masks kept through fine-tuning, honest metrics, sparse checkpoints."""
import json

import pytest
import torch
from torch import nn

from fedcore_adapter import load_model, run_setup
from fedcore_adapter.checkpoint import load_state, save_checkpoint
from fedcore_adapter.errors import ConfigError, NodeError
from fedcore_adapter.nodes.pruning import UnstructuredPruningConfig, apply_unstructured_pruning
from fedcore_adapter.nodes.pruning.unstructured import compute_masks, scheduled_sparsity, target_weights
from tests.nodes.test_pruning import ConvDataModule, X, node_context, res_conv, same_outputs, setup


def test_schedules_start_low_and_reach_the_target_at_the_last_step():
    assert [round(scheduled_sparsity("linear", 0.8, k, 4), 4) for k in range(1, 5)] == [0.2, 0.4, 0.6, 0.8]
    assert [round(scheduled_sparsity("cubic", 0.8, k, 4), 4) for k in range(1, 5)] == [0.4625, 0.7, 0.7875, 0.8]
    assert [round(scheduled_sparsity("cosine", 0.8, k, 4), 4) for k in range(1, 5)] == [0.1172, 0.4, 0.6828, 0.8]
    agp = UnstructuredPruningConfig.model_validate({"kind": "unstructured_pruning", "schedule": "AGP"})
    assert agp.schedule == "cubic"


def test_global_masks_rank_across_layers_and_local_masks_per_layer():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    global_masks = compute_masks(scores, 0.5, global_pruning=True)
    assert global_masks["a"].tolist() == [False] * 4 and global_masks["b"].tolist() == [True] * 4
    local = compute_masks(scores, 0.5, global_pruning=False)
    assert local["a"].tolist() == local["b"].tolist() == [False, False, True, True]


def test_sparsity_is_reached_kept_through_fine_tuning_and_reported_per_layer(tmp_path):
    result = run_setup(setup({"kind": "unstructured_pruning", "sparsity": 0.6, "pruning_iterations": 2, "epochs": 2,
                              "global_pruning": False}), res_conv(), ConvDataModule(), output_dir=tmp_path)
    before, after = result.metrics
    weights = target_weights(result.model)
    for name, w in weights.items():
        assert float((w == 0).float().mean()) == pytest.approx(0.6, abs=1 / w.numel()), name
        assert not w._backward_hooks  # masks made permanent: no hook left behind
    report = json.loads((result.output_dir / "final" / "sparsity.json").read_text())
    assert set(report["layers"]) == set(weights) and report["overall"] == pytest.approx(0.6, abs=0.01)
    assert after["sparsity"] == pytest.approx(0.6, abs=0.01) and before["sparsity"] == 0.0
    # Honest metrics: zeros in dense tensors shrink neither the parameter count, the MACs nor the bytes.
    assert (after["params"], after["macs"]) == (before["params"], before["macs"])
    assert after["size_mb"] == pytest.approx(before["size_mb"], rel=0.01)


def test_taylor_and_random_importance_sparsify_too(tmp_path):
    model = res_conv()
    for importance in ("taylor", "random"):
        out = apply_unstructured_pruning(model, UnstructuredPruningConfig(sparsity=0.5, importance=importance),
                                         node_context(ConvDataModule(), tmp_path, model, limit_valid_batches=2))
        total = sum(w.numel() for w in target_weights(out).values())
        zeros = sum(int((w == 0).sum()) for w in target_weights(out).values())
        assert zeros == pytest.approx(0.5 * total, abs=1)


def test_sparse_format_checkpoint_counts_sparse_bytes_and_reloads_dense(tmp_path):
    node = {"kind": "unstructured_pruning", "sparsity": 0.9, "global_pruning": False}
    dense = run_setup(setup(node), res_conv(width=32), ConvDataModule(), output_dir=tmp_path / "dense")
    sparse = run_setup(setup({**node, "sparse_format": True}), res_conv(width=32), ConvDataModule(),
                       output_dir=tmp_path / "sp")
    assert sparse.metrics[1]["size_mb"] < 0.5 * dense.metrics[1]["size_mb"]
    assert dense.metrics[1]["size_mb"] == pytest.approx(dense.metrics[0]["size_mb"], rel=0.01)
    stored = torch.load(sparse.output_dir / "final" / "state.pt", weights_only=True)
    assert stored["head.1.weight"].layout == torch.sparse_csr
    assert stored["head.1.weight"].col_indices().dtype == torch.int32
    assert stored["stem.1.weight"].layout == torch.strided  # a BatchNorm vector gains nothing from CSR
    assert same_outputs(load_model(sparse.output_dir, res_conv(seed=7, width=32)), sparse.model, X)


def test_sparse_checkpoint_restores_conv_shapes_and_keeps_dense_what_csr_would_not_shrink(tmp_path):
    conv = nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.8)
    save_checkpoint(conv, tmp_path / "ck", [], sparse=True)
    state = load_state(tmp_path / "ck")
    assert state["weight"].shape == (6, 4, 3, 3) and torch.equal(state["weight"], conv.weight)
    assert torch.equal(state["bias"], conv.bias)
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["sparse_shapes"] == {"weight": [6, 4, 3, 3]}


@pytest.mark.parametrize("node, message", [
    ({"sparsity": 1.0}, r"\.sparsity = 1\.0: .*must be in \[0, 1\)"),
    ({"importance": "lamp"}, r"\.importance = 'lamp': .*valid: magnitude, taylor, random"),
    ({"sparsity": 0.5, "pruning_ratio": 0.5}, r"give sparsity or pruning_ratio"),
])
def test_bad_options_fail_validation(tmp_path, node, message):
    with pytest.raises(ConfigError, match=message):
        run_setup(setup({"kind": "unstructured_pruning", **node}), res_conv(), ConvDataModule(), output_dir=tmp_path)


def test_unknown_ignored_layer_names_the_node_and_leaves_the_model_untouched(tmp_path):
    model = res_conv()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NodeError, match=r"node 0:pruning: ignored_layers names layer 'head\.7'"):
        apply_unstructured_pruning(model, UnstructuredPruningConfig(ignored_layers=["head.7"]),
                                   node_context(ConvDataModule(), tmp_path, model))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_fedcore_pruning_ratio_is_the_sparsity():
    config = UnstructuredPruningConfig.model_validate({"kind": "unstructured_pruning", "pruning_ratio": 0.7,
                                                       "pruner_name": "magnitude_pruner",
                                                       "importance": "MagnitudeImportance"})
    assert (config.sparsity, config.importance) == (0.7, "magnitude")
