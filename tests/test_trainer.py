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


def _embedding_cosine(student, teacher, batch):
    from fedcore_adapter.losses import pooled_cosine_distance

    return 1 - pooled_cosine_distance(student(**batch).last_hidden_state, teacher(**batch).last_hidden_state,
                                      batch["attention_mask"]).item()


def test_unlabeled_loss_cosine_brings_the_mean_pooled_embeddings_towards_the_teachers(tmp_path):
    teacher = TinyEncoder()
    student = copy.deepcopy(teacher)
    torch.nn.init.normal_(student.proj.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    dm = TokenDataModule()
    ctx = _ctx(student, dm, tmp_path)
    ctx.teacher = teacher
    batch = next(iter(dm.test_dataloader()))
    before = _embedding_cosine(student, teacher, batch)
    train(student, ctx, TrainParams(epochs=10, learning_rate=1e-2, unlabeled_loss="cosine", progress=False))
    after = _embedding_cosine(student, teacher, batch)
    assert before < 0.9 and 1 - after < (1 - before) * 0.5


@pytest.mark.parametrize("loss, moves", [("cosine", False), ("mse", True)])
def test_unlabeled_loss_decides_what_is_learned_the_cosine_ignores_the_embeddings_length(tmp_path, loss, moves):
    teacher = TinyEncoder()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # every embedding twice the teacher's: the same directions
        student.proj.weight.mul_(2)
        student.proj.bias.mul_(2)
    start = copy.deepcopy(student.proj.weight)
    ctx = _ctx(student, TokenDataModule(), tmp_path)
    ctx.teacher = teacher
    train(student, ctx, TrainParams(epochs=2, learning_rate=0.1, optimizer="sgd", unlabeled_loss=loss,
                                    progress=False))
    assert torch.allclose(student.proj.weight, start, atol=1e-5) is not moves


class _FFNEncoder(torch.nn.Module):
    """``TinyEncoder`` with an FFN whose hidden channels the pruning node can remove."""

    def __init__(self):
        super().__init__()
        self.emb, self.up, self.down = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self.down(torch.relu(self.up(self.emb(input_ids)))))


def test_unlabeled_loss_is_an_option_of_a_setups_training_and_of_the_pruning_nodes_fine_tune(tmp_path, monkeypatch):
    import fedcore_adapter.trainer as trainer

    used = []
    real = trainer.unlabeled_distillation
    monkeypatch.setattr(trainer, "unlabeled_distillation",
                        lambda *args: used.append(args[3:]) or real(*args))
    setup = tiny_setup({"kind": "training", "epochs": 1, "unlabeled_loss": "cosine", "unlabeled_mse_weight": 0.1},
                       {"kind": "pruning", "pruning_ratio": 0.25, "finetune_params": {
                           "epochs": 1, "unlabeled_loss": "cosine"}})
    result = run_setup(setup, _FFNEncoder(), TokenDataModule(), output_dir=tmp_path)
    assert result.model.up.out_features == 24  # the node pruned, then fine-tuned
    assert used == [("cosine", 0.1)] * 6 + [("cosine", 0.0)] * 6  # 6 batches in each of the two loops


@pytest.mark.parametrize("option, message", [
    ({"unlabeled_loss": "kl"}, r"nodes\[0\] \(training\)\.unlabeled_loss.*'mse' or 'cosine'"),
    ({"unlabeled_mse_weight": 0.5}, r"unlabeled_mse_weight adds the output mse to unlabeled_loss cosine; with "
                                    r"unlabeled_loss mse leave it 0 \(got 0.5\)"),
    ({"unlabeled_loss": "cosine", "unlabeled_mse_weight": -1}, r"unlabeled_mse_weight.*greater than or equal to 0"),
])
def test_a_wrong_unlabeled_loss_is_refused_in_one_line(tmp_path, option, message):
    with pytest.raises(ConfigError, match=message) as err:
        run_setup(tiny_setup({"kind": "training", **option}), TinyEncoder(), TokenDataModule(), output_dir=tmp_path)
    assert "\n" not in str(err.value)


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


@pytest.mark.parametrize("option", [{"distill": True}, {"distill_weight": 0.3}, {"unlabeled_loss": "cosine"},
                                    {"unlabeled_loss": "cosine", "unlabeled_mse_weight": 1.0}])
def test_fine_tune_distillation_options_on_the_distillation_node_are_refused_not_ignored(tmp_path, option):
    with pytest.raises(ConfigError, match=r"nodes\[0\] \(distillation\).*options of training and fine-tunes, not of "
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


class _ScalarEncoder(torch.nn.Module):
    """One number per sentence: nothing for a cosine to compare."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.emb(input_ids).sum((1, 2))


def test_a_cosine_on_outputs_without_a_vector_per_sample_fails_the_node_in_one_line(tmp_path):
    from fedcore_adapter.errors import RunError

    setup = tiny_setup({"kind": "training", "epochs": 1, "unlabeled_loss": "cosine", "progress": False})
    with pytest.raises(RunError, match=r"a cosine needs a vector per sample; the output has shape \(8,\)") as err:
        run_setup(setup, _ScalarEncoder(), TokenDataModule(), output_dir=tmp_path)
    assert "\n" not in str(err.value)
