"""FedCore's flow: layers as trainable U, S, Vh; Hoyer and orthogonality losses; read back sorted."""
import pytest
import torch
from torch import nn

from fedcore_adapter.nodes.low_rank.regularized import (SVDParametrized, hoyer, orthogonality, regularizer,
                                                        trained_spectrum)
from fedcore_adapter.nodes.low_rank.svd import factorize, split, svd, weight_matrix
from tests.nodes.test_low_rank_layers import CASES


@pytest.mark.parametrize("name,make,data,mode", CASES, ids=[c[0] for c in CASES])
def test_an_svd_parametrised_layer_starts_as_the_layer_and_turns_back_into_it(name, make, data, mode):
    layer, x = make(), data()
    svd_layer = SVDParametrized(layer, mode)
    torch.testing.assert_close(svd_layer(x), layer(x), atol=1e-5, rtol=1e-4)
    dense = svd_layer.dense()
    assert type(dense) is type(layer)
    torch.testing.assert_close(dense(x), layer(x), atol=1e-5, rtol=1e-4)


def test_a_factorised_layer_can_be_trained_as_u_s_vh():
    layer = nn.Linear(10, 6)
    fact = factorize(layer, "channel", *split(*svd(weight_matrix(layer, "channel")), 3))
    x = torch.randn(4, 10)
    torch.testing.assert_close(SVDParametrized(fact, "channel")(x), fact(x), atol=1e-5, rtol=1e-4)


def test_losses_are_zero_orthogonality_and_the_l1_over_l2_ratio_of_s_at_the_start():
    model = nn.Sequential(SVDParametrized(nn.Linear(8, 4), "channel"), SVDParametrized(nn.Linear(4, 4), "channel"))
    assert orthogonality(model).item() == pytest.approx(0.0, abs=1e-8)
    ratios = [(m.S.abs().sum() / m.S.norm()).item() for m in model]
    assert hoyer(model).item() == pytest.approx(sum(ratios) / 2)
    assert regularizer(0.2, 5.0)(model).item() == pytest.approx(0.2 * sum(ratios) / 2, rel=1e-5)


def test_training_with_the_hoyer_loss_makes_the_spectrum_sparser():
    torch.manual_seed(0)
    svd_layer = SVDParametrized(nn.Linear(16, 16), "channel")
    model = nn.Sequential(svd_layer)
    before = hoyer(model).item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        optimizer.zero_grad()
        regularizer(1.0, 5.0)(model).backward()
        optimizer.step()
    assert hoyer(model).item() < 0.8 * before
    assert orthogonality(model).item() < 0.05


def test_trained_spectrum_sorts_by_magnitude_and_keeps_the_product():
    layer = SVDParametrized(nn.Linear(5, 4), "channel")
    with torch.no_grad():
        layer.S.copy_(torch.tensor([0.1, -3.0, 2.0, 0.5]))
    sp = trained_spectrum("x", layer)
    assert sp.s.tolist() == pytest.approx([3.0, 2.0, 0.5, 0.1])
    torch.testing.assert_close((sp.u * sp.s) @ sp.vh, ((layer.U * layer.S) @ layer.Vh).detach().double())


def test_the_nodes_u_s_vh_training_with_the_hoyer_loss_concentrates_the_spectrum(tmp_path):
    """A random 64 x 64 layer needs most of its rank for 90% energy (not factorised); after the node's
    regularised training, the same threshold keeps far fewer components and the layer is factorised."""
    from fedcore_adapter import run_setup
    from fedcore_adapter.nodes.low_rank import FactorizedLayer
    from tests.conftest import TinyDataModule, tiny_setup

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))

    node = {"kind": "low_rank", "thresholds": [0.9], "epochs": 5, "learning_rate": 0.01, "layer_types": ["linear"]}
    plain = run_setup(tiny_setup({**node, "hoyer_loss": 0, "orthogonal_loss": 0}, measure=False), mlp(),
                      TinyDataModule(n_train=48), output_dir=tmp_path / "plain")
    sparse = run_setup(tiny_setup({**node, "hoyer_loss": 1.0, "orthogonal_loss": 5}, measure=False), mlp(),
                       TinyDataModule(n_train=48), output_dir=tmp_path / "sparse")
    assert isinstance(plain.model[2], nn.Linear)
    assert isinstance(sparse.model[2], FactorizedLayer)  # a rank that saves params (<= 31) now keeps 90%
