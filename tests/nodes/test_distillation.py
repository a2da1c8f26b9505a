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


def _prune_then_distill(tmp_path, start_from_checkpoint: bool, **distill):
    """training -> pruning -> distillation on the tiny MLP, whole, or (``start_from_checkpoint``) the distillation
    alone started from the pruning node's checkpoint with the original model given as the teacher."""
    from fedcore_adapter.checkpoint import load_model
    from tests.conftest import TinyDataModule, tiny_mlp

    prune = {"kind": "pruning", "pruning_ratio": 0.5, "finetune_params": {"epochs": 0}}
    node = {"kind": "distillation", "epochs": 2, "learning_rate": 0.01, "temperature": 2.0, **distill}
    if not start_from_checkpoint:
        return run_setup(tiny_setup(prune, node, seed=7), tiny_mlp(), TinyDataModule(), output_dir=tmp_path / "whole")
    pruned = run_setup(tiny_setup(prune, seed=7), tiny_mlp(), TinyDataModule(), output_dir=tmp_path / "first")
    start = load_model(pruned.output_dir / "final", tiny_mlp())
    return run_setup(tiny_setup(node, name="REST", seed=8), start, TinyDataModule(), output_dir=tmp_path / "rest",
                     teacher=tiny_mlp())  # seed 8: the node's seed as index 1 of the whole chain


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_a_distillation_started_from_a_pruned_checkpoint_with_the_teacher_given_learns_as_the_whole_chain(
        tmp_path, with_checkpoint):
    """``teacher=``: the chain's own input model teaches (and rebuilds a ``teacher_checkpoint``) when the run starts
    from a compressed checkpoint inside the chain, as a search's trial started from a computed prefix does."""
    from tests.conftest import TinyDataModule, tiny_mlp

    distill = {}
    if with_checkpoint:  # the original model saved as a checkpoint: the teacher given by file
        teacher = run_setup(tiny_setup({"kind": "training", "epochs": 1, "learning_rate": 0.05}, name="TEACH"),
                            tiny_mlp(), TinyDataModule(),
                            output_dir=tmp_path / "teacher")
        distill = {"teacher_checkpoint": str(teacher.output_dir / "final")}
    whole = _prune_then_distill(tmp_path, False, **distill)
    rest = _prune_then_distill(tmp_path, True, **distill)
    a, b = whole.model.state_dict(), rest.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.metrics[-1]["accuracy"] == rest.metrics[-1]["accuracy"]


def test_a_teacher_checkpoint_that_cannot_be_rebuilt_on_the_runs_teacher_is_one_line_naming_it(tmp_path):
    """Started from a pruned checkpoint without ``teacher=``, the original model's checkpoint cannot be rebuilt on
    the (pruned) input model: the error names ``teacher_checkpoint``, on one line."""
    from fedcore_adapter.checkpoint import load_model
    from fedcore_adapter.errors import RunError
    from tests.conftest import TinyDataModule, tiny_mlp

    original = run_setup(tiny_setup({"kind": "training", "epochs": 0}), tiny_mlp(), TinyDataModule(),
                         output_dir=tmp_path / "o")
    pruned = run_setup(tiny_setup({"kind": "pruning", "pruning_ratio": 0.5, "finetune_params": {"epochs": 0}},
                                  name="P"), tiny_mlp(), TinyDataModule(), output_dir=tmp_path / "p")
    node = {"kind": "distillation", "epochs": 1, "teacher_checkpoint": str(original.output_dir / "final")}
    with pytest.raises((ConfigError, RunError), match=r"teacher_checkpoint=.*cannot be rebuilt") as err:
        run_setup(tiny_setup(node, name="D"), load_model(pruned.output_dir / "final", tiny_mlp()), TinyDataModule(),
                  output_dir=tmp_path / "d")
    assert "\n" not in str(err.value)
