"""A module's own objective: real ptls CoLESModule / SequenceToTarget are trained and evaluated on their steps."""
from __future__ import annotations

import copy

import pytest
import torch
import torchmetrics

from fedcore_adapter.context import NodeContext
from fedcore_adapter.data import make_loader
from fedcore_adapter.losses import find_loss
from fedcore_adapter.metrics import evaluate
from fedcore_adapter.schema import CommonConfig, TrainParams
from fedcore_adapter.steps import own_step
from fedcore_adapter.trainer import train
from tests.ptls_helpers import coles, coles_data, seq_to_target, target_data

CPU = torch.device("cpu")


def _ctx(model, dm, tmp_path):
    return NodeContext(train_loader=make_loader(dm, "train_dataloader"), val_loader=make_loader(dm, "val_dataloader"),
                       test_loader=None, loss_fn=find_loss(model), device=CPU, teacher=copy.deepcopy(model).eval(),
                       output_dir=tmp_path, common=CommonConfig())


def test_ptls_and_lightning_modules_are_told_apart_from_plain_ones():
    assert own_step(coles()) == "shared_step"
    assert own_step(seq_to_target()) == "training_step"
    assert own_step(torch.nn.Linear(2, 2)) is None


def test_a_coles_loss_is_ptls_own_shared_step_loss_on_normalised_embeddings_and_reports_no_accuracy():
    model = coles().eval()
    batch = next(iter(coles_data().val_dataloader()))
    with torch.no_grad():
        expected = float(model._loss(*model.shared_step(*batch)))
        raw = float(model._loss(model(batch[0]), batch[1]))  # what the loss would be without the head
    row = evaluate(model, [batch], find_loss(model), CPU)
    assert row["loss"] == pytest.approx(expected, rel=1e-5) and abs(raw - expected) > 1e-3
    assert row["accuracy"] is None
    assert 0.0 <= row["recall_top_k"] <= 1.0  # ptls's own validation metric (BatchRecallTopK) is the quality column


def test_sequence_to_target_reports_its_own_torchmetrics_as_quality_columns():
    model = seq_to_target()
    model.valid_metrics["f1"] = torchmetrics.F1Score(task="multiclass", num_classes=4, average="macro")
    loader = target_data().val_dataloader()
    with torch.no_grad():
        preds, targets = zip(*((model.eval()(x), y) for x, y in loader))
    preds, targets = torch.cat(preds), torch.cat(targets)
    row = evaluate(model, loader, find_loss(model), CPU)
    assert row["accuracy"] == pytest.approx(float((preds.argmax(1) == targets).float().mean()))
    f1 = torchmetrics.functional.f1_score(preds, targets, task="multiclass", num_classes=4, average="macro")
    assert row["f1"] == pytest.approx(float(f1))
    assert row["loss"] == pytest.approx(float(torch.nn.functional.nll_loss(preds, targets)), rel=1e-5)


def test_training_a_coles_module_trains_its_head_on_its_own_loss(tmp_path):
    from ptls.frames.coles import CoLESModule
    from ptls.nn.normalization import L2NormEncoder

    encoder = coles().seq_encoder
    head = torch.nn.Sequential(torch.nn.Linear(8, 8), L2NormEncoder())  # a projection head, as in SimCLR
    model = CoLESModule(seq_encoder=encoder, head=head)
    before = head[0].weight.detach().clone()
    dm = coles_data()
    report = train(model, _ctx(model, dm, tmp_path), TrainParams(epochs=1, progress=False))
    assert not torch.equal(head[0].weight, before)  # the loss went through the head
    assert report.history[-1]["val_recall_top_k"] >= 0 and "val_accuracy" not in report.history[-1]


def test_training_a_sequence_to_target_runs_its_training_step_and_resets_its_metrics(tmp_path):
    model, dm = seq_to_target(), target_data()
    report = train(model, _ctx(model, dm, tmp_path), TrainParams(epochs=2, learning_rate=1e-2, progress=False))
    assert len(report.history) == 2 and report.history[-1]["val_accuracy"] is not None
    assert model.train_metrics["accuracy"].update_count == 0  # accumulated train-step updates were reset


def test_taylor_pruning_gradients_of_a_coles_module_come_from_its_own_loss():
    from fedcore_adapter.nodes.pruning.backend import accumulate_gradients

    model, batch = coles(), next(iter(coles_data().val_dataloader()))
    accumulate_gradients(model, [batch], find_loss(model), CPU)
    taylor = model.seq_encoder.seq_encoder.rnn.weight_hh_l0.grad.clone()
    model.zero_grad()
    model._loss(*model.eval().shared_step(*batch)).backward()
    torch.testing.assert_close(taylor, model.seq_encoder.seq_encoder.rnn.weight_hh_l0.grad)
