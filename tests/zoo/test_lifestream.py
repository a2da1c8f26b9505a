"""Real pytorch-lifestream models and data modules through fedcore_fit: measured on the same batches,
on their own objective, and reloadable onto a freshly built model."""
from __future__ import annotations

import pytest
import torch
from ptls.data_load.padded_batch import PaddedBatch

from fedcore_adapter import fedcore_fit
from fedcore_adapter.checkpoint import load_model
from fedcore_adapter.data import seeded
from fedcore_adapter.zoo import lifestream
from tests.ptls_helpers import coles, coles_data, seq_to_target, target_data

QUICK = {"latency_repeats": 2, "latency_warmup": 1}


def test_generated_transactions_are_ptls_feature_dicts_of_50_to_300_events():
    records = lifestream.generate_transactions(num_clients=50, seed=1)
    lengths = [len(r["mcc"]) for r in records]
    assert min(lengths) >= 50 and max(lengths) <= 300 and len(set(lengths)) > 10
    assert set(records[0]) == {"client_id", "target", "event_time", "mcc", "tr_type", "amount"}
    assert all(len(r["amount"]) == len(r["mcc"]) == len(r["event_time"]) for r in records)


def test_a_coles_module_on_a_ptls_data_module_runs_through_fedcore_fit_on_its_own_objective(tmp_path):
    model, dm = coles(), coles_data()
    setup = {"name": "COLES", "common": QUICK, "nodes": [
        {"kind": "training", "epochs": 1, "progress": False},
        {"kind": "distillation", "epochs": 1, "kl_weight": 0, "mse_weight": 1, "progress": False}]}
    result = fedcore_fit(model, dm, setup, output_folder=str(tmp_path / "COLES"), limit_train_batches=2)
    rows = result.metrics
    with seeded(result.setup.common.seed):
        x, y = next(iter(dm.val_dataloader()))  # the batch every row was measured on
    assert isinstance(x, PaddedBatch) and [r["batch_size"] for r in rows] == [len(x)] * 3
    assert len({r["macs"] for r in rows}) == 1 and rows[0]["macs"] > 0  # the same batches on every row
    with torch.no_grad():
        expected = float(model._loss(*model.eval().shared_step(x, y)))
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-5)  # ptls's own loss: embeddings normalised by its head
    assert all(r["accuracy"] is None and 0 <= r["recall_top_k"] <= 1 for r in rows)


@pytest.mark.parametrize("build, data, node", [
    (coles, coles_data, {"kind": "distillation", "epochs": 1, "kl_weight": 0, "mse_weight": 1}),
    (coles, coles_data, {"kind": "pruning", "pruning_ratio": 0.5, "epochs": 0, "finetune_params": {"epochs": 1}}),
    (coles, coles_data, {"kind": "low_rank", "method": {"name": "svd", "epochs": 1}, "finetune_params": {"epochs": 1}}),
    (coles, coles_data, {"kind": "ptq_dynamic"}),
    (seq_to_target, target_data, {"kind": "ptq_dynamic"}),
    (seq_to_target, target_data, {"kind": "pruning", "pruning_ratio": 0.5, "epochs": 0,
                                  "finetune_params": {"epochs": 1}}),
], ids=["coles-distillation", "coles-pruning", "coles-low_rank", "coles-ptq_dynamic", "seq_to_target-ptq_dynamic",
        "seq_to_target-pruning"])
def test_every_compressed_ptls_model_reloads_onto_a_freshly_built_one_with_the_same_outputs(tmp_path, build, data,
                                                                                             node):
    setup = {"name": "C", "common": QUICK, "nodes": [{"kind": "training", "epochs": 1}, node]}
    result = fedcore_fit(build(), data(), setup, output_folder=str(tmp_path / "C"), limit_train_batches=2)
    fresh = load_model(result.output_dir / "final", build(seed=5))
    x, _ = next(iter(data().val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), result.optimised_model.eval()(x))
