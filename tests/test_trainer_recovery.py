"""Recovery fine-tunes: distillation from the node's input on labeled data, and keeping the best epoch."""
import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from fedcore_adapter.errors import ConfigError
from fedcore_adapter.losses import labeled_distillation, soft_target_kl
from fedcore_adapter.schema import Setup, TrainParams
from fedcore_adapter.trainer import default_objective, train
from tests.conftest import TinyDataModule, tiny_mlp
from tests.test_trainer import _ctx


class WrongLabels(TinyDataModule):
    """The tiny problem with every training label replaced by class 0."""

    def __init__(self):
        super().__init__()
        x, _ = self.train.tensors
        self.train = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))


def _trained_teacher(tmp_path):
    teacher, dm = tiny_mlp(), TinyDataModule()
    train(teacher, _ctx(teacher, dm, tmp_path), TrainParams(epochs=20, learning_rate=1e-2, progress=False))
    return teacher


def _agreement(a, b, dm) -> float:
    x = dm.test.tensors[0]
    with torch.no_grad():
        return (a(x).argmax(1) == b(x).argmax(1)).float().mean().item()


def _finetune(teacher, tmp_path, node_input, **options):
    dm = WrongLabels()
    student = copy.deepcopy(teacher)
    params = TrainParams(epochs=15, learning_rate=1e-2, progress=False, keep_best=False, **options)
    train(student, _ctx(teacher, dm, tmp_path), params, node_input=node_input)
    return _agreement(student, teacher, dm)


def test_a_distilling_recovery_finetune_follows_the_node_input_over_the_labels(tmp_path):
    teacher = _trained_teacher(tmp_path)
    assert _finetune(teacher, tmp_path, node_input=teacher, distill="auto", distill_weight=1.0) > 0.9  # labels ignored
    assert _finetune(teacher, tmp_path, node_input=teacher, distill=True, distill_weight=1.0) > 0.9
    assert _finetune(teacher, tmp_path, node_input=teacher) < 0.6  # distill is off by default: labels learned


def test_distill_auto_is_off_without_a_node_input_so_the_training_node_learns_the_labels(tmp_path):
    teacher = _trained_teacher(tmp_path)
    assert _finetune(teacher, tmp_path, node_input=None, distill="auto", distill_weight=1.0) < 0.6


def test_the_labeled_objective_mixes_task_loss_and_soft_targets_by_distill_weight():
    torch.manual_seed(0)
    student, teacher = tiny_mlp(seed=1), tiny_mlp(seed=2)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    ce = torch.nn.CrossEntropyLoss()
    loss = default_objective(teacher, ce, teacher, weight=0.25, temperature=3.0)(student, x, y)
    expected = 0.75 * ce(student(x), y) + 0.25 * soft_target_kl(student(x), teacher(x), 3.0)
    assert loss.item() == pytest.approx(expected.item())


def test_soft_targets_are_scaled_by_t_squared_and_vanish_on_agreement():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    assert soft_target_kl(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_target_kl(s, t, 4.0) > 0
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.softmax(t / 2, -1), reduction="batchmean")
    assert soft_target_kl(s, t, 2.0).item() == pytest.approx(4 * kl.item(), rel=1e-5)


def test_real_valued_targets_distil_by_output_mse():
    s, t = torch.zeros(3, 2), torch.ones(3, 2)
    assert labeled_distillation(s, t, torch.zeros(3, 2), 4.0).item() == pytest.approx(1.0)


def test_keep_best_never_ends_worse_than_the_start_on_validation(tmp_path):
    teacher = _trained_teacher(tmp_path)
    dm = WrongLabels()  # fine-tuning on these labels only hurts
    ctx = _ctx(teacher, dm, tmp_path)
    params = TrainParams(epochs=5, learning_rate=5e-2, progress=False)
    kept, spoiled = copy.deepcopy(teacher), copy.deepcopy(teacher)
    report = train(kept, ctx, params, recovery=True)
    train(spoiled, ctx, params.model_copy(update={"keep_best": False}), recovery=True)
    assert report.best_epoch == 0 and _agreement(kept, teacher, dm) == 1.0
    assert _agreement(spoiled, teacher, dm) < 0.6


def test_keep_best_auto_keeps_the_last_epoch_when_it_beats_the_start(tmp_path):
    model, dm = tiny_mlp(), TinyDataModule()  # untrained: every epoch of training beats the start
    report = train(model, _ctx(model, dm, tmp_path), TrainParams(epochs=4, learning_rate=1e-2, progress=False),
                   recovery=True)
    assert report.best_epoch == 4
    with torch.no_grad():
        x, y = dm.val.tensors
        assert (model(x).argmax(1) == y).float().mean().item() == pytest.approx(report.history[-1]["val_accuracy"])


def test_keep_best_keeps_the_best_validation_epoch(tmp_path):
    model, dm = tiny_mlp(), TinyDataModule()
    report = train(model, _ctx(model, dm, tmp_path), TrainParams(epochs=6, learning_rate=1e-2, progress=False,
                                                                 keep_best=True))
    accuracies = [0.0] + [h["val_accuracy"] for h in report.history]
    assert accuracies[report.best_epoch] == max(accuracies)
    with torch.no_grad():
        x, y = dm.val.tensors
        assert (model(x).argmax(1) == y).float().mean().item() == pytest.approx(max(accuracies))


def test_keep_best_auto_is_off_outside_recovery_finetunes(tmp_path):
    model, dm = tiny_mlp(), TinyDataModule()
    report = train(model, _ctx(model, dm, tmp_path), TrainParams(epochs=2, progress=False))
    assert report.best_epoch is None


@pytest.mark.parametrize("field", ["distill", "keep_best"])
def test_distill_and_keep_best_accept_auto_true_false_only(field):
    assert TrainParams(**{field: "False"}).model_dump()[field] is False
    with pytest.raises(ConfigError, match=rf"finetune_params\.{field} = 'maybe': .*must be auto, true or false"):
        Setup.parse({"nodes": [{"kind": "pruning", "finetune_params": {"epochs": 1, field: "maybe"}}]})
