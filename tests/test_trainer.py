"""The shared training loop: learns, stops early, clips, distills on unlabeled data."""
import copy

import pytest
import torch

from fedcore_adapter import run_setup
from fedcore_adapter.context import NodeContext
from fedcore_adapter.errors import ConfigError
from fedcore_adapter.schema import CommonConfig, TrainParams
from fedcore_adapter.trainer import train
from tests.conftest import TinyDataModule, TinyEncoder, TokenDataModule, tiny_mlp, tiny_setup


def _ctx(model, dm, tmp_path, **common):
    return NodeContext(train_loader=dm.train_dataloader(), val_loader=dm.val_dataloader(),
                       test_loader=dm.test_dataloader(), loss_fn=torch.nn.CrossEntropyLoss(),
                       device=torch.device("cpu"), teacher=copy.deepcopy(model).eval(), output_dir=tmp_path,
                       common=CommonConfig(**common))


def test_training_lowers_the_loss(tmp_path):
    model, dm = tiny_mlp(), TinyDataModule()
    report = train(model, _ctx(model, dm, tmp_path), TrainParams(epochs=5, learning_rate=1e-2, progress=False))
    losses = [h["train_loss"] for h in report.history]
    assert report.epochs_run == 5 and losses[-1] < losses[0] * 0.7
    assert report.history[-1]["val_accuracy"] > 0.6


def test_early_stopping_stops_after_patience_and_keeps_the_best_weights(tmp_path):
    model, dm = tiny_mlp(), TinyDataModule()
    params = TrainParams(epochs=30, learning_rate=5e-2, progress=False,
                         early_stopping={"monitor": "val_loss", "patience": 2, "min_delta": 10.0})
    report = train(model, _ctx(model, dm, tmp_path), params)
    assert report.stopped_early and report.epochs_run == 3  # epoch 1 sets the best; 2 and 3 do not beat it by 10


def test_limit_train_batches_bounds_each_epoch(tmp_path):
    model, dm = tiny_mlp(), TinyDataModule()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]) if m.training else None)
    train(model, _ctx(model, dm, tmp_path, limit_train_batches=2), TrainParams(epochs=1, progress=False))
    assert len(seen) == 2


def test_unlabeled_batches_learn_by_distilling_from_the_teacher(tmp_path):
    teacher = TinyEncoder()
    student = copy.deepcopy(teacher)
    torch.nn.init.zeros_(student.proj.weight)
    dm = TokenDataModule()
    ctx = _ctx(student, dm, tmp_path)
    ctx.teacher = teacher
    batch = next(iter(dm.test_dataloader()))
    before = (student(**batch).last_hidden_state - teacher(**batch).last_hidden_state).pow(2).mean()
    train(student, ctx, TrainParams(epochs=10, learning_rate=1e-2, progress=False))
    after = (student(**batch).last_hidden_state - teacher(**batch).last_hidden_state).pow(2).mean()
    assert after < before * 0.5


def test_distillation_node_moves_the_student_towards_the_teacher(tmp_path):
    dm = TinyDataModule()
    teacher = tiny_mlp(seed=0)
    trained = run_setup(tiny_setup({"kind": "training", "epochs": 5, "learning_rate": 1e-2}), teacher, dm,
                        output_dir=tmp_path / "t").model
    student = tiny_mlp(seed=1)
    result = run_setup(tiny_setup({"kind": "distillation", "epochs": 10, "learning_rate": 1e-2,
                                   "teacher_checkpoint": str(tmp_path / "t" / "T" / "final"), "mse_weight": 1.0},
                                  name="D"),
                       student, dm, output_dir=tmp_path)
    x = torch.randn(64, 8)
    gap_before = (student(x) - trained(x)).pow(2).mean()
    gap_after = (result.model(x) - trained(x)).pow(2).mean()
    assert gap_after < gap_before * 0.5


@pytest.mark.parametrize("option", [{"distill": True}, {"distill_weight": 0.3}])
def test_fine_tune_distillation_options_on_the_distillation_node_are_refused_not_ignored(tmp_path, option):
    with pytest.raises(ConfigError, match=r"nodes\[0\] \(distillation\).*options of recovery fine-tunes, not of "
                                          r"the distillation node; set its loss with kl_weight") as err:
        run_setup(tiny_setup({"kind": "distillation", **option}), tiny_mlp(), TinyDataModule(), output_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_distillation_loss_ignores_padded_token_positions():
    from fedcore_adapter.losses import distillation_mse

    teacher = torch.zeros(2, 4, 3)
    student = teacher.clone()
    student[:, 2:] = 5.0  # differs only where the tokens are padding
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    assert distillation_mse(student, teacher, mask) == 0
    assert distillation_mse(student, teacher) > 0  # no mask: every position counts
    student[0, 0, 0] = 1.0
    assert distillation_mse(student, teacher, mask) == pytest.approx(1.0 / (4 * 3))  # mean over real tokens


def test_the_distillation_nodes_mse_term_ignores_padded_token_positions_too():
    from fedcore_adapter.nodes.distillation import DistillationConfig, distillation_loss

    config = DistillationConfig(kind="distillation", kl_weight=0.0, mse_weight=1.0, task_weight=0.0)
    teacher = torch.zeros(1, 3, 2)
    student = teacher.clone()
    student[:, 2] = 4.0  # differs only on the padded token
    mask = torch.tensor([[1, 1, 0]])
    assert distillation_loss(student, teacher, None, config, None, mask) == 0
    assert distillation_loss(student, teacher, None, config, None) > 0
