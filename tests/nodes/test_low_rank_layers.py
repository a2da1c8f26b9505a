"""Factorised layers: exact at full rank, the promised parameter count, JSON round trip, re-factorisation."""
import pytest
import torch
from torch import nn

from fedcore_adapter.nodes.low_rank.layers import FactorizedLayer, build_module, module_config
from fedcore_adapter.nodes.low_rank.svd import factorize, factors_of, split, svd, weight_matrix
from fedcore_adapter.nodes.low_rank.targets import make_target

torch.manual_seed(0)
CASES = [
    ("linear", lambda: nn.Linear(12, 7), lambda: torch.randn(3, 5, 12), "channel"),
    ("conv1d", lambda: nn.Conv1d(6, 8, 5, stride=2, padding=2), lambda: torch.randn(2, 6, 20), "channel"),
    ("conv2d", lambda: nn.Conv2d(4, 6, 3, padding=1, dilation=1), lambda: torch.randn(2, 4, 9, 9), "channel"),
    ("conv2d_spatial", lambda: nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2)),
     lambda: torch.randn(2, 4, 9, 11), "spatial"),
    ("embedding", lambda: nn.Embedding(30, 8, padding_idx=0), lambda: torch.randint(0, 30, (2, 7)), "channel"),
]


def _full_rank_factorisation(layer, mode):
    u, s, vh = svd(weight_matrix(layer, mode))
    a, b = split(u, s, vh, len(s))
    return factorize(layer, mode, a, b)


@pytest.mark.parametrize("name,make,data,mode", CASES, ids=[c[0] for c in CASES])
def test_full_rank_factorisation_reproduces_the_layer(name, make, data, mode):
    layer, x = make(), data()
    fact = _full_rank_factorisation(layer, mode)
    assert isinstance(fact, FactorizedLayer) and fact.mode == mode
    torch.testing.assert_close(fact(x), layer(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,make,data,mode", CASES, ids=[c[0] for c in CASES])
def test_rank_r_factorisation_has_r_times_rows_plus_cols_weights(name, make, data, mode):
    layer = make()
    u, s, vh = svd(weight_matrix(layer, mode))
    a, b = split(u, s, vh, 2)
    fact = factorize(layer, mode, a, b)
    target = make_target("x", layer, mode, {})
    assert sum(p.numel() for p in fact.parameters()) == target.params_at(2)
    assert fact.rank == 2


def test_spatial_mode_is_a_k_by_1_then_1_by_k_convolution():
    fact = _full_rank_factorisation(nn.Conv2d(4, 6, (3, 5), padding=(1, 2)), "spatial")
    assert fact.first.kernel_size == (3, 1) and fact.second.kernel_size == (1, 5)


def test_channel_mode_is_a_k_conv_to_r_channels_then_a_1x1_conv():
    u, s, vh = svd(weight_matrix(nn.Conv2d(4, 6, 3), "channel"))
    fact = factorize(nn.Conv2d(4, 6, 3), "channel", *split(u, s, vh, 3))
    assert (fact.first.out_channels, fact.first.kernel_size) == (3, (3, 3))
    assert (fact.second.in_channels, fact.second.kernel_size) == (3, (1, 1))


def test_truncation_error_is_the_dropped_singular_values():
    layer = nn.Linear(10, 8)
    u, s, vh = svd(weight_matrix(layer, "channel"))
    fact = factorize(layer, "channel", *split(u, s, vh, 3))
    error = torch.linalg.matrix_norm(weight_matrix(fact, "channel") - weight_matrix(layer, "channel"))
    assert float(error) == pytest.approx(float(s[3:].pow(2).sum().sqrt()), rel=1e-5)


@pytest.mark.parametrize("name,make,data,mode", CASES, ids=[c[0] for c in CASES])
def test_module_config_rebuilds_the_same_structure(name, make, data, mode):
    fact = _full_rank_factorisation(make(), mode)
    rebuilt = build_module(module_config(fact))
    rebuilt.load_state_dict(fact.state_dict())
    x = data()
    torch.testing.assert_close(rebuilt(x), fact(x))
    assert module_config(rebuilt) == module_config(fact)


@pytest.mark.parametrize("name,make,data,mode", CASES, ids=[c[0] for c in CASES])
def test_a_factorised_layer_reads_back_as_its_matrix(name, make, data, mode):
    layer = make()
    fact = _full_rank_factorisation(layer, mode)
    a, b = factors_of(fact)
    torch.testing.assert_close(a @ b, weight_matrix(layer, mode), atol=1e-5, rtol=1e-4)


def test_unknown_module_type_in_a_config_is_named():
    with pytest.raises(ValueError, match="unknown module type 'LSTM'"):
        build_module({"type": "LSTM"})


@pytest.mark.parametrize("layer", [nn.Conv1d(4, 6, 3), nn.Conv2d(4, 6, (1, 3)), nn.Conv2d(4, 6, 3, padding="same")],
                         ids=["conv1d", "1xk", "same_padding"])
def test_spatial_mode_falls_back_to_channel_where_the_kx1_1xk_form_is_not_exact(layer):
    assert make_target("x", layer, "spatial", {}).mode == "channel"


def test_a_factorised_layer_quantized_to_int8_still_reports_its_rank_and_prints():
    """PTQ_1's chain (low-rank, then dynamic int8): the int8 Linear's ``weight`` is a method, yet the model prints."""
    layer = FactorizedLayer(nn.Linear(12, 5), nn.Linear(5, 7), "linear")
    model = torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)
    assert model[0].rank == 5
    assert "rank=5" in repr(model)


def test_a_factorised_conv_whose_second_half_is_int8_still_reports_its_rank_and_prints():
    """``ptq_dynamic allow_conv`` turns the 1x1 second half into an ``Int8Conv``, which keeps no float weight."""
    from fedcore_adapter.nodes.quantization.conv import Int8Conv

    layer = FactorizedLayer(nn.Conv1d(4, 3, 3), nn.Conv1d(3, 8, 1), "conv")
    layer.second.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    layer.second = Int8Conv.from_conv(layer.second)
    assert layer.rank == 3 and (layer.second.in_channels, layer.second.out_channels) == (3, 8)
    assert "rank=3" in repr(layer)
