"""The distillation node's cosine term: 1 - cosine of the (mean-pooled) outputs, weighted by cosine_weight."""
import copy

import pytest
import torch

from fedcore_adapter import run_setup
from fedcore_adapter.errors import ConfigError
from fedcore_adapter.losses import pooled_cosine_distance
from fedcore_adapter.nodes.distillation import DistillationConfig, distillation_loss
from tests.conftest import TinyEncoder, TokenDataModule, tiny_setup


def test_the_cosine_term_is_the_weighted_cosine_distance_of_the_mean_pooled_outputs():
    config = DistillationConfig(kind="distillation", kl_weight=0.0, cosine_weight=2.0)
    teacher, student = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert distillation_loss(student, teacher, None, config, None, mask).item() == pytest.approx(
        2 * pooled_cosine_distance(student, teacher, mask).item())
    assert distillation_loss(5 * teacher, teacher, None, config, None, mask).item() == pytest.approx(0, abs=1e-6)


def test_a_distillation_node_on_the_cosine_alone_aligns_the_sentence_embeddings(tmp_path):
    teacher = TinyEncoder()
    student = copy.deepcopy(teacher)
    torch.nn.init.normal_(student.proj.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    dm = TokenDataModule()
    batch = next(iter(dm.test_dataloader()))

    def distance(model):
        with torch.no_grad():
            return pooled_cosine_distance(model(**batch).last_hidden_state, teacher(**batch).last_hidden_state,
                                          batch["attention_mask"]).item()

    before = distance(student)
    run_setup(tiny_setup({"kind": "training", "epochs": 0}), teacher, dm, output_dir=tmp_path / "t")  # its checkpoint
    node = {"kind": "distillation", "epochs": 10, "learning_rate": 1e-2, "kl_weight": 0, "cosine_weight": 1,
            "teacher_checkpoint": str(tmp_path / "t" / "T" / "final"), "progress": False}
    result = run_setup(tiny_setup(node, name="D"), student, dm, output_dir=tmp_path)
    assert before > 0.1 and distance(result.model) < before * 0.5


def test_a_distillation_node_without_any_loss_weight_names_the_cosine_weight_too(tmp_path):
    node = {"kind": "distillation", "kl_weight": 0}
    with pytest.raises(ConfigError, match="at least one of kl_weight, mse_weight, cosine_weight, task_weight"):
        run_setup(tiny_setup(node), TinyEncoder(), TokenDataModule(), output_dir=tmp_path)
