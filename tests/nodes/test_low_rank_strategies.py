"""Rank strategies and the global budget: pure functions of the spectrum and the layer's shape."""
import pytest
import torch

from fedcore_adapter.nodes.low_rank.allocation import BudgetError, LayerSpectrum, allocate, minimum_total
from fedcore_adapter.nodes.low_rank.rank_strategies import choose_rank, kept_fraction
from fedcore_adapter.nodes.low_rank.targets import Target

S = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5, 0.1])  # sigma^2: 16, 4, 1, 1, 0.25, 0.01 (sum 22.26)


def target(rows=6, cols=10, name="layer", macs_per_rank=None, tokens=1):
    params = rows * cols + rows
    return Target(name, "linear", "channel", rows, cols, params=params, bias=rows, macs=rows * cols * tokens,
                  macs_per_rank=macs_per_rank if macs_per_rank is not None else (rows + cols) * tokens)


@pytest.mark.parametrize("threshold,rank", [(0.5, 1), (0.7187, 1), (0.72, 2), (0.9, 3), (0.95, 4), (0.99, 5), (1.0, 6)])
def test_energy_keeps_the_smallest_rank_reaching_the_threshold(threshold, rank):
    r = choose_rank("energy", S, target(), threshold=threshold)
    assert r == rank
    assert kept_fraction(S, r) >= threshold - 1e-9


def test_explained_variance_weights_components_by_the_input_variance_they_see():
    weights = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # the input never varies along v1, v2
    assert choose_rank("explained_variance", S, target(), threshold=0.9, weights=weights) == 5
    assert choose_rank("explained_variance", S, target(), threshold=0.5, weights=weights) == 4
    assert choose_rank("explained_variance", S, target(), threshold=0.9) == 3  # no data: as energy
    assert kept_fraction(S, 4, weights) == pytest.approx(2 / 2.26)


def test_quantile_keeps_singular_values_above_the_quantile():
    assert choose_rank("quantile", S, target(), threshold=0.5) == 2  # median 1.0: keeps 4 and 2


def test_fixed_rank_and_rank_ratio():
    assert choose_rank("rank", S, target(), rank=3) == 3
    assert choose_rank("rank_ratio", S, target(), threshold=0.5) == 3
    assert choose_rank("rank_ratio", S, target(), threshold=0.01) == 1


def test_params_ratio_gives_the_largest_rank_within_the_share_of_parameters():
    t = target(rows=6, cols=10)  # 66 params; rank r: 16 r + 6
    assert choose_rank("params_ratio", S, t, threshold=0.5) == 1  # 33 -> (33 - 6) // 16
    assert choose_rank("params_ratio", S, t, threshold=0.9) == 3  # 59.4 -> 3 (54 params)


def test_unknown_strategy_lists_the_allowed_ones():
    with pytest.raises(ValueError,
                       match="allowed: energy, explained_variance, quantile, rank, rank_ratio, params_ratio"):
        choose_rank("magic", S, target(), threshold=0.5)


def test_a_layer_is_only_factorised_at_ranks_that_save_parameters_and_macs():
    t = target(rows=6, cols=10)
    assert t.largest_saving_rank() == 3  # 16*3+6 = 54 < 66; 16*4+6 = 70
    assert t.saves(3) and not t.saves(4)
    assert not target(macs_per_rank=100).saves(1)  # MACs would grow


def _spectra():
    flat = LayerSpectrum(target(rows=20, cols=20, name="flat"), torch.ones(20))
    steep = LayerSpectrum(target(rows=20, cols=20, name="steep"), 2.0 ** -torch.arange(20.0))
    return [flat, steep]


def test_budget_meets_the_params_target_and_spends_rank_where_energy_is():
    layers = _spectra()
    total = 1000 + sum(layer.target.params for layer in layers)
    target_total = 1000 + 0.5 * sum(layer.target.params for layer in layers)
    ranks = allocate(layers, total, target_total, "params")
    spent = 1000 + sum(x.target.params_at(ranks[x.target.name]) if ranks[x.target.name] else x.target.params
                       for x in layers)
    assert spent <= target_total
    assert ranks["flat"] > ranks["steep"]  # the steep spectrum loses little at a low rank
    assert ranks["steep"] <= 4


def test_budget_leaves_embeddings_alone_in_macs_mode():
    emb = Target("emb", "embedding", "channel", 100, 8, params=800, bias=0, macs=0, macs_per_rank=8)
    ranks = allocate([LayerSpectrum(emb, torch.ones(8))], 800, 800, "macs")
    assert ranks == {"emb": None}


def test_an_unreachable_budget_says_the_smallest_reachable_total():
    layers = _spectra()
    floor = minimum_total([x.target for x in layers], 2000, "params")
    assert floor == 2000 - 2 * (420 - 60)
    with pytest.raises(BudgetError, match=f"smallest model reachable has {floor} params"):
        allocate(layers, 2000, floor - 1, "params")
