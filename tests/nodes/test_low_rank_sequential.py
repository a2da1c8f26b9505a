"""Sequential, error-compensating falor fit (falor_fit='sequential') and the cosine rank metric."""
import json

import pytest
import torch
from torch import nn

from fedcore_adapter import load_model, run_setup
from fedcore_adapter.nodes.low_rank.calibration import collect_output_covariances
from fedcore_adapter.nodes.low_rank.falor import cosine_loss, falor_factors, model_outputs, noise_to_signal, \
    top_eigenvectors
from fedcore_adapter.nodes.low_rank.config import LowRankConfig
from fedcore_adapter.nodes.low_rank.layers import FactorizedLayer
from fedcore_adapter.nodes.low_rank.output_weights import gradient_grams, sqrt_pair
from fedcore_adapter.nodes.low_rank.sequential import _Cross, forward_groups, refit_full, sequential_fit
from fedcore_adapter.nodes.low_rank.svd import factorize
from tests.conftest import TinyEncoder, TokenDataModule, tiny_setup


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8)).eval()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 16, generator=torch.Generator().manual_seed(99)) * torch.linspace(1, 0.1, 16)
    return torch.randn(n, 16, generator=g) @ mix.T + 0.5


def _projection(model, inputs, ranks):
    covs = collect_output_covariances(model, inputs, list(ranks))
    out = _copy(model)
    for name, r in ranks.items():
        a, b = falor_factors(model.get_submodule(name), top_eigenvectors(covs[name])[:, :r])
        _replace(out, name, factorize(model.get_submodule(name), "channel", a, b))
    return out


def _copy(model):
    import copy
    return copy.deepcopy(model)


def _sequential(model, inputs, ranks, damping=1e-3):
    out = _copy(model)
    sequential_fit(model, out, ranks, inputs, damping,
                   lambda n, a, b, bias: _replace(out, n, factorize(model.get_submodule(n), "channel", a, b,
                                                                    bias.float())))
    return out


def test_sequential_fit_has_a_lower_output_error_than_projection_at_the_same_ranks():
    model = _mlp()
    calib = [_data(256, s) for s in range(4)]
    held_out = _data(512, 10)  # error measured on other samples than those fitted on
    ranks = {"0": 6, "2": 6, "4": 4}
    projected, sequential = _projection(model, calib, ranks), _sequential(model, calib, ranks)
    with torch.no_grad():
        reference = model(held_out)
        nsr_projection = noise_to_signal(projected(held_out), reference)
        nsr_sequential = noise_to_signal(sequential(held_out), reference)
    assert isinstance(sequential[2], FactorizedLayer) and sequential[2].rank == 6
    assert nsr_sequential < 0.8 * nsr_projection  # measured: 0.27 vs 0.36


def test_a_layer_fitted_on_undisturbed_inputs_keeps_its_mean_output_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    calib = [_data(300, 1)]
    fitted = _sequential(model, calib, {"0": 3})
    with torch.no_grad():
        error = fitted(calib[0]) - model(calib[0])
        projected_error = _projection(model, calib, {"0": 3})(calib[0]) - model(calib[0])
    torch.testing.assert_close(error.mean(0), torch.zeros(12), atol=1e-4, rtol=0)
    assert (error**2).sum() <= (projected_error**2).sum() * 1.0001  # the best rank-3 affine fit of this layer


def test_layers_fed_by_the_same_tensor_are_one_group_in_forward_order():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value, self.out = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            q, k, v = self.query(x), self.key(x), self.value(x)
            return self.out(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)

    model = nn.Sequential(nn.Linear(8, 8), Attention())
    groups = forward_groups(model, ["1.out", "1.key", "0", "1.query", "1.value"], torch.randn(2, 5, 8))
    assert groups == [["0"], ["1.query", "1.key", "1.value"], ["1.out"]]


def test_cosine_loss_compares_mean_pooled_real_tokens():
    class Encoder(nn.Module):
        def forward(self, input_ids, attention_mask):
            from types import SimpleNamespace
            return SimpleNamespace(last_hidden_state=input_ids.float().unsqueeze(-1).repeat(1, 1, 2))

    batch = {"input_ids": torch.tensor([[1, 3, 100]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    pooled = model_outputs(Encoder(), [batch], "cosine")[0]
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 2.0]]))  # the padded token (100) is left out
    assert cosine_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])) == \
        torch.tensor(1 - 2 ** -0.5).item()


def _low_rank_encoder():
    torch.manual_seed(0)
    model = TinyEncoder(hidden=32)
    with torch.no_grad():
        model.emb.weight.copy_(torch.randn(50, 4) @ torch.randn(4, 32) + 0.05 * torch.randn(50, 32))
    return model


@pytest.mark.parametrize("weighting", ["none", "gradient"])
def test_the_node_fits_sequentially_by_cosine_and_the_result_reloads_exactly(tmp_path, weighting):
    node = {"kind": "low_rank", "method": "falor", "falor_fit": "sequential", "falor_metric": "cosine",
            "cosine_loss_threshold": 1e-3, "allocation": "global", "falor_weighting": weighting}
    result = run_setup(tiny_setup(node, measure=False), _low_rank_encoder(), TokenDataModule(), output_dir=tmp_path)
    record = json.loads((result.output_dir / "nodes" / "1_low_rank" / "decompose_config.json").read_text())
    meta, layer = record["meta"], record["layers"]["proj"]
    assert meta["fit"] == "sequential" and meta["metric"] == "cosine" and meta["model_cosine_loss"] < 1e-3
    assert meta["weighting"] == weighting and ("probes" in meta) == (weighting == "gradient")
    assert layer["rank"] < 16 and layer["meta"]["cosine_loss"] < 1e-3
    loaded = load_model(result.output_dir / "final", TinyEncoder(hidden=32))
    ids = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(loaded(ids).last_hidden_state, result.model(ids).last_hidden_state)


def test_a_1x1_conv_is_fitted_sequentially_too(tmp_path):
    from tests.nodes.test_low_rank_falor import _LowRankImages

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    dm = _LowRankImages()
    node = {"kind": "low_rank", "method": "falor", "falor_fit": "sequential", "nsr_threshold": 1e-4}
    result = run_setup(tiny_setup(node, measure=False), model, dm, output_dir=tmp_path)
    assert isinstance(result.model[0], FactorizedLayer) and result.model[0].rank == 3
    x = next(iter(dm.test_dataloader()))[0]
    torch.testing.assert_close(result.model(x), model(x), atol=1e-3, rtol=1e-3)


def _weighted_sequential(model, inputs, ranks, metric="nsr", probes=16):
    grams = gradient_grams(model, inputs, list(ranks), metric, probes)
    out = _copy(model)
    sequential_fit(model, out, ranks, inputs, 1e-3,
                   lambda n, a, b, bias: _replace(out, n, factorize(model.get_submodule(n), "channel", a, b,
                                                                    bias.float())),
                   {n: sqrt_pair(g) for n, g in grams.items()})
    return out


def test_the_gradient_gram_of_a_linear_map_is_its_jacobian_squared_even_with_frozen_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).requires_grad_(False)
    gram = gradient_grams(model, [torch.randn(8, 4)], ["0"], "nsr", probes=2000)["0"]
    w2 = model[1].weight.double()
    torch.testing.assert_close(gram, w2.T @ w2, atol=0.05 * float(w2.T.matmul(w2).abs().max()), rtol=0)
    assert all(p.grad is None for p in model.parameters())


def test_gradient_weighting_keeps_the_directions_the_output_depends_on():
    # layer 0's strongest output directions (0..7) are ones layer 2 barely reads; it reads the weak ones (8..15)
    torch.manual_seed(0)
    first = nn.Linear(16, 16)
    with torch.no_grad():
        first.weight.copy_(torch.diag(torch.cat([torch.full((8,), 10.0), torch.full((8,), 1.0)])))
        first.bias.zero_()
    last = nn.Linear(16, 4)
    with torch.no_grad():
        last.weight.copy_(torch.cat([0.01 * torch.randn(4, 8), torch.randn(4, 8)], 1))
    model = nn.Sequential(first, nn.Tanh(), last).eval()
    calib = [torch.randn(256, 16) * 0.1 for _ in range(4)]
    held_out = torch.randn(512, 16) * 0.1
    ranks = {"0": 8}
    plain, weighted = _sequential(model, calib, ranks), _weighted_sequential(model, calib, ranks)
    with torch.no_grad():
        reference = model(held_out)
        nsr_plain = noise_to_signal(plain(held_out), reference)
        nsr_weighted = noise_to_signal(weighted(held_out), reference)
    assert nsr_weighted < 0.1 * nsr_plain


def test_gradient_weighting_needs_the_sequential_fit():
    with pytest.raises(ValueError, match="falor_weighting='gradient' works with falor_fit='sequential' only "
                                         r"\(got falor_fit='projection'\)"):
        LowRankConfig(method="falor", falor_weighting="gradient")


def test_the_rank_search_with_an_identity_output_weight_measures_what_the_plain_search_does():
    from fedcore_adapter.nodes.low_rank.falor import FalorJob, falor_search, model_rows

    model = _mlp()
    calib = [_data(128, s) for s in range(2)]
    cov = collect_output_covariances(model, calib, ["2"])["2"]
    eye = torch.eye(32, dtype=torch.float64)
    search = dict(model=model, inputs=calib, references=model_rows(model, calib), nsr_threshold=1.0,
                  kl_threshold=None, grid=4)
    plain = falor_search(FalorJob("2", cov, 12), **search)
    weighted = falor_search(FalorJob("2", cov, 12, (eye, eye)), **search)
    assert [t["rank"] for t in plain.trials] == [3, 6, 9, 12]
    for a, b in zip(plain.trials, weighted.trials):
        assert a["rank"] == b["rank"] and abs(a["nsr"] - b["nsr"]) < 1e-6


def test_a_kept_layer_refitted_on_undisturbed_inputs_is_unchanged():
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    stats = _Cross()
    x = _data(300, 1).double()
    stats.add(x, x)
    weight, bias = refit_full(layer.weight.detach().double(), layer.bias, stats, damping=1.0)
    torch.testing.assert_close(weight, layer.weight.detach().double())
    torch.testing.assert_close(bias, layer.bias.detach().double())


def test_refitting_the_kept_layers_absorbs_the_error_of_those_compressed_before_them():
    model = _mlp()
    calib = [_data(256, s) for s in range(4)]
    held_out = _data(512, 10)
    ranks = {"2": 8}

    def fitted(refit):
        out = _copy(model)
        sequential_fit(model, out, ranks, calib, 1e-3,
                       lambda n, a, b, bias: _replace(out, n, factorize(model.get_submodule(n), "channel", a, b,
                                                                        bias.float())), refit=refit)
        return out

    plain, refitted = fitted(()), fitted(["0", "4"])  # "0" runs before the compressed layer: nothing to absorb
    with torch.no_grad():
        reference = model(held_out)
        nsr_plain = noise_to_signal(plain(held_out), reference)
        nsr_refit = noise_to_signal(refitted(held_out), reference)
    assert type(refitted[4]) is nn.Linear and refitted[4].weight.shape == (8, 32)  # same shape, no param added
    assert not torch.equal(refitted[4].weight, model[4].weight) and torch.equal(plain[4].weight, model[4].weight)
    torch.testing.assert_close(refitted[0].weight, model[0].weight)  # its inputs were undisturbed
    assert nsr_refit < 0.95 * nsr_plain  # measured: 0.073 vs 0.082


def test_the_node_refits_the_kept_layers_on_request_and_the_result_reloads_exactly(tmp_path):
    from tests.nodes.test_low_rank_falor import _DeepEncoder, _deep_encoder

    node = {"kind": "low_rank", "method": "falor", "allocation": "global", "falor_metric": "cosine",
            "falor_fit": "sequential", "budget": {"ratio": 0.8}, "grid_points": 6}
    ids = next(iter(TokenDataModule().test_dataloader()))
    for refit in (False, True):
        result = run_setup(tiny_setup({**node, "falor_refit_kept": refit}, measure=False), _deep_encoder(),
                           TokenDataModule(), output_dir=tmp_path / str(refit))
        record = json.loads((result.output_dir / "nodes" / "1_low_rank" / "decompose_config.json").read_text())
        meta, kept = record["meta"], sorted({"proj", "up", "down"} - set(record["layers"]))
        assert meta["refit_kept"] == (kept if refit else [])
        loaded = load_model(result.output_dir / "final", _DeepEncoder())
        torch.testing.assert_close(loaded(**ids).last_hidden_state, result.model(**ids).last_hidden_state)
    assert kept  # the budget left some layers whole
