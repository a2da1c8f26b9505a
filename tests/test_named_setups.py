"""The six named setups hold exactly the FedCore definitions (reference/fedcore_setups.md)."""
import pytest

from fedcore_adapter.building import resolve_setup as load_setup
from fedcore_adapter.setups import named_setups

CHAINS = {
    "RAW": ["training"],
    "TEST": ["training", "pruning", "low_rank", "qat"],
    "COMPOSITE_1": ["training", "pruning", "low_rank", "pruning"],
    "COMPOSITE_2": ["training", "low_rank", "pruning", "low_rank"],
    "QAT_1": ["training", "low_rank", "qat"],
    "PTQ_1": ["training", "low_rank", "ptq_dynamic"],
}
# setup -> (training epochs, pruning (epochs, iterations, finetune), low rank (epochs, finetune), qat epochs)
EPOCHS = {
    "TEST": (1, (1, 3, 1), (1, 1), 1),
    "COMPOSITE_1": (10, (5, 5, 10), (20, 10), None),
    "COMPOSITE_2": (30, (20, 3, 10), (10, 10), None),
    "QAT_1": (50, None, (20, 20), 10),
    "PTQ_1": (50, None, (20, 20), None),
}


def test_exactly_the_six_named_setups_ship():
    assert sorted(named_setups()) == sorted(CHAINS)


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_each_setup_has_its_chain_under_any_case(name):
    for spelling in (name, name.lower(), name.title()):
        setup = load_setup(spelling)
        assert setup.name == name and [n.kind for n in setup.nodes] == CHAINS[name]
    assert load_setup(name).common.save_each == (10 if name == "RAW" else -1)


@pytest.mark.parametrize("name", sorted(EPOCHS))
def test_each_setup_has_the_reference_parameters(name):
    training, pruning, low_rank, qat = EPOCHS[name]
    nodes = load_setup(name).nodes
    assert nodes[0].epochs == training
    for node in nodes:
        if node.kind == "pruning":
            assert (node.epochs, node.pruning_iterations, node.finetune_params.epochs) == pruning
            assert (node.importance, node.importance_norm, node.pruning_ratio, node.learning_rate) == \
                ("magnitude", 1, 0.75, 0.001)
        if node.kind == "low_rank":
            svd = node.method
            assert (svd.name, svd.epochs, node.finetune_params.epochs) == ("svd", *low_rank)
            assert (svd.hoyer_loss, svd.orthogonal_loss, svd.thresholds, svd.decomposing_mode,
                    svd.spectrum_pruning_strategy, svd.learning_rate) == (0.2, 5, [0.9], "channel", "energy", 0.001)
        if node.kind == "qat":
            assert node.epochs == qat
        if node.kind == "ptq_dynamic":
            assert (node.allow_conv, node.allow_emb) == (False, False)


def test_qat_1_and_ptq_1_are_not_confused_with_each_other():
    assert load_setup("qat_1").nodes[-1].kind == "qat"
    assert load_setup("ptq_1").nodes[-1].kind == "ptq_dynamic"
