"""Activation-aware (falor) decomposition: output covariance, NSR-bounded ranks, unlabeled dict batches."""
import copy
import json

import pytest
import torch
from torch import nn

from fedcore_adapter import load_model, run_setup
from fedcore_adapter.nodes.low_rank.allocation import BudgetError, allocate_nsr, allocate_to_saving
from fedcore_adapter.nodes.low_rank.calibration import collect_output_covariances, input_statistics
from fedcore_adapter.nodes.low_rank.falor import FalorResult, noise_to_signal, top_eigenvectors
from fedcore_adapter.nodes.low_rank.layers import FactorizedLayer
from tests.conftest import TinyEncoder, TokenDataModule, tiny_setup


def low_rank_feature_encoder(seed: int = 0) -> nn.Module:
    """A text encoder whose token embeddings span 4 of 32 dimensions: features are low-rank, the
    projection's weights are not (a random, full-rank 32 x 32 matrix)."""
    torch.manual_seed(seed)
    model = TinyEncoder(hidden=32)
    with torch.no_grad():
        model.emb.weight.copy_(torch.randn(50, 4) @ torch.randn(4, 32))
    return model


def _run(tmp_path, **node):
    return run_setup(tiny_setup({"kind": "low_rank", "method": "falor", **node}, measure=False),
                     low_rank_feature_encoder(), TokenDataModule(), output_dir=tmp_path)


def _config(result):
    return json.loads((result.output_dir / "nodes" / "1_low_rank" / "decompose_config.json").read_text())


def test_finds_the_rank_of_the_features_on_unlabeled_dict_batches(tmp_path):
    result = _run(tmp_path, nsr_threshold=1e-4)
    layer = result.model.proj
    assert isinstance(layer, FactorizedLayer) and layer.rank <= 4
    record = _config(result)["layers"]["proj"]
    assert record["meta"]["nsr"] < 1e-4 and record["meta"]["evaluations"] >= 2
    ids = torch.randint(0, 50, (3, 6))
    torch.testing.assert_close(layer(result.model.emb(ids)), low_rank_feature_encoder().proj(result.model.emb(ids)),
                               atol=1e-4, rtol=1e-4)


def test_weight_svd_cannot_see_that_low_rank(tmp_path):
    result = run_setup(tiny_setup({"kind": "low_rank", "thresholds": [0.99], "layer_types": ["linear"]}, measure=False),
                       low_rank_feature_encoder(), TokenDataModule(), output_dir=tmp_path)
    assert not isinstance(result.model.proj, FactorizedLayer)  # a random weight: 99% energy needs ~all ranks


def test_a_tighter_threshold_never_keeps_a_smaller_rank(tmp_path):
    model = low_rank_feature_encoder()
    with torch.no_grad():  # add a weak fifth direction so the rank depends on the threshold
        model.emb.weight.add_(0.05 * torch.randn(50, 32))
    ranks = []
    for i, nsr in enumerate([0.05, 1e-3]):
        result = run_setup(tiny_setup({"kind": "low_rank", "method": "falor", "nsr_threshold": nsr}, measure=False),
                           model, TokenDataModule(), output_dir=tmp_path / str(i))
        meta = _config(result)["layers"]["proj"]["meta"]
        assert meta["nsr"] < nsr
        ranks.append(meta["rank"])
    assert ranks[0] <= ranks[1]


def test_the_decomposed_model_reloads_from_its_checkpoint(tmp_path):
    result = _run(tmp_path, nsr_threshold=1e-3, allocation="global")
    loaded = load_model(result.output_dir / "final", TinyEncoder(hidden=32))
    ids = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(loaded(ids).last_hidden_state, result.model(ids).last_hidden_state)
    meta = _config(result)["meta"]
    assert meta["allocation"] == "global" and meta["model_nsr"] < 1e-3


def test_noise_to_signal_is_error_power_over_signal_variance_per_channel():
    reference = torch.tensor([[0.0, 10.0], [2.0, 10.0], [4.0, 30.0], [6.0, 30.0]])  # variances 5 and 100
    noisy = reference + torch.tensor([1.0, 0.0])
    assert noise_to_signal(noisy, reference) == pytest.approx((1 / 5 + 0) / 2, rel=1e-4)


def test_eigenvectors_come_largest_first():
    cov = torch.diag(torch.tensor([1.0, 9.0, 4.0])).double()
    vectors = top_eigenvectors(cov)
    assert vectors[:, 0].abs().argmax() == 1 and vectors[:, 1].abs().argmax() == 2


def test_global_allocation_spends_the_nsr_budget_where_it_saves_most():
    cheap = FalorResult("cheap", None, trials=[{"rank": 8, "nsr": 0.001}, {"rank": 2, "nsr": 0.002}])
    costly = FalorResult("costly", None, trials=[{"rank": 8, "nsr": 0.05}, {"rank": 2, "nsr": 0.5}])
    params_at = {"cheap": lambda r: 20 * r, "costly": lambda r: 20 * r}
    ranks = allocate_nsr([cheap, costly], params_at, {"cheap": 200, "costly": 200}, 0.01, None)
    assert ranks == {"cheap": 2, "costly": None}
    ranks = allocate_nsr([cheap, costly], params_at, {"cheap": 200, "costly": 200}, 0.06, None)
    assert ranks == {"cheap": 2, "costly": 8}


def test_output_statistics_exclude_the_bias_and_input_covariance_matches_torch():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(64, 3) + 1.0
    y = (x @ layer[0].weight.T).double()
    torch.testing.assert_close(collect_output_covariances(layer, [x], ["0"])["0"], y.T @ y / 64)  # E[y y^T]
    cov = collect_output_covariances(layer, [x], ["0"], centered=True)["0"]
    torch.testing.assert_close(cov, torch.cov(y.T, correction=0))
    stats = input_statistics(layer, [x], {"0": "channel"})["0"]
    torch.testing.assert_close(stats, torch.cov(x.double().T, correction=0))


@pytest.mark.text
def test_falor_on_minilm_keeps_sentence_embeddings_close(tmp_path):
    from fedcore_adapter.zoo.text import TextDataModule, embedding_cosine, load_minilm

    model = load_minilm(attn_implementation="sdpa")  # fused attention: the same outputs, faster on the CPU
    fresh = copy.deepcopy(model)  # a freshly built original for load_model (cheaper than loading it again)
    # covariance on 4 x 8 sentences, NSR on the first 8 (the search's ~9 forward passes are the cost)
    dm = TextDataModule(n_train=8, n_val=32, n_test=16, batch_size=8, max_length=32, pad_to_max_length=False)
    node = {"kind": "low_rank", "method": "falor", "nsr_threshold": 0.01, "include": ["encoder.layer.5.output.dense"]}
    result = run_setup(tiny_setup(node, measure=False, limit_valid_batches=4), model, dm, output_dir=tmp_path)
    record = _config(result)["layers"]["encoder.layer.5.output.dense"]
    assert record["meta"]["nsr"] < 0.01 and record["rank"] < 307  # 307: the largest rank that saves params
    assert embedding_cosine(model, result.model, dm.test_dataloader())["mean_cosine"] > 0.95  # unseen sentences
    loaded = load_model(result.output_dir / "final", fresh)
    batch = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(loaded(**batch).last_hidden_state, result.model(**batch).last_hidden_state)


def test_output_covariance_of_a_1x1_conv_is_over_channels_at_every_pixel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    x = torch.randn(2, 3, 5, 5)
    cov = collect_output_covariances(model, [x], ["0"], centered=True)["0"]
    y = torch.einsum("oc,bchw->bhwo", model[0].weight[:, :, 0, 0], x).reshape(-1, 4).double()
    torch.testing.assert_close(cov, torch.cov(y.T.detach(), correction=0))


def test_padded_tokens_are_left_out_of_the_statistics():
    torch.manual_seed(0)
    model = TinyEncoder(hidden=8)
    ids = torch.randint(1, 50, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    padded = {"input_ids": ids, "attention_mask": mask}
    real = [{"input_ids": ids[:1], "attention_mask": mask[:1]},
            {"input_ids": ids[1:, :2], "attention_mask": mask[1:, :2]}]
    torch.testing.assert_close(collect_output_covariances(model, [padded], ["proj"])["proj"],
                               collect_output_covariances(model, real, ["proj"])["proj"])
    torch.testing.assert_close(input_statistics(model, [padded], {"proj": "channel", "emb": "channel"})["emb"],
                               input_statistics(model, real, {"proj": "channel", "emb": "channel"})["emb"])


def test_the_optional_kl_bound_is_honoured_too(tmp_path):
    model = low_rank_feature_encoder()
    with torch.no_grad():  # a weak fifth direction: the exact rank-4 projection changes the output a little
        model.emb.weight.add_(0.05 * torch.randn(50, 32))
    node = {"kind": "low_rank", "method": "falor", "nsr_threshold": 0.05}
    loose = run_setup(tiny_setup({**node, "kl_threshold": 1e-3}, measure=False), model, TokenDataModule(),
                      output_dir=tmp_path / "loose")
    meta = _config(loose)["layers"]["proj"]["meta"]
    assert meta["nsr"] < 0.05 and meta["kl"] < 1e-3
    strict = run_setup(tiny_setup({**node, "kl_threshold": 1e-5}, measure=False), model, TokenDataModule(),
                       output_dir=tmp_path / "strict")
    assert isinstance(strict.model.proj, nn.Linear)  # no rank that saves params meets the KL bound: left as is


class _LowRankImages:
    """8-channel 5x5 images whose channels mix 3 latent ones: the features of a 1x1 conv are rank 3."""

    def __init__(self):
        from torch.utils.data import DataLoader, TensorDataset

        g = torch.Generator().manual_seed(0)
        mix = torch.randn(8, 3, generator=g)

        def make(n):
            x = torch.einsum("cl,nlhw->nchw", mix, torch.randn(n, 3, 5, 5, generator=g))
            return TensorDataset(x, torch.randint(0, 4, (n,), generator=g))

        self.loaders = {k: DataLoader(make(n), batch_size=16) for k, n in (("train", 32), ("val", 32), ("test", 16))}
        self.train_dataloader = lambda: self.loaders["train"]
        self.val_dataloader = lambda: self.loaders["val"]
        self.test_dataloader = lambda: self.loaders["test"]


def test_a_1x1_conv_becomes_two_1x1_convs_through_its_feature_rank(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    dm = _LowRankImages()
    result = run_setup(tiny_setup({"kind": "low_rank", "method": "falor", "nsr_threshold": 1e-4}, measure=False),
                       model, dm, output_dir=tmp_path)
    layer = result.model[0]
    assert isinstance(layer, FactorizedLayer) and layer.rank == 3
    assert layer.first.kernel_size == (1, 1) and layer.second.kernel_size == (1, 1)
    assert isinstance(result.model[2], nn.Conv2d)  # a 3x3 conv is not a falor layer: left as it is
    x = next(iter(dm.test_dataloader()))[0]
    torch.testing.assert_close(result.model(x), model(x), atol=1e-4, rtol=1e-4)
    loaded = load_model(result.output_dir / "final", nn.Sequential(nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 4, 3),
                                                                   nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    torch.testing.assert_close(loaded(x), result.model(x))


def _curve_results():
    cheap = FalorResult("cheap", None, trials=[{"rank": 8, "nsr": 0.001}, {"rank": 4, "nsr": 0.002},
                                               {"rank": 2, "nsr": 0.004}])
    costly = FalorResult("costly", None, trials=[{"rank": 8, "nsr": 0.05}, {"rank": 2, "nsr": 0.5}])
    return [cheap, costly], {"cheap": lambda r: 20 * r, "costly": lambda r: 20 * r}, {"cheap": 200, "costly": 200}


def test_a_saving_target_is_met_with_the_least_loss_and_the_last_move_shortened_to_it():
    results, cost_at, cost_now = _curve_results()
    ranks, estimates = allocate_to_saving(results, cost_at, cost_now, 140)  # cheap 8 -> 4 saves 120, 2 -> 160
    assert ranks == {"cheap": 3, "costly": None}  # rank 3 saves exactly 140; rank 2 would save more than needed
    assert estimates == {"cheap": {"rank": 3, "nsr": pytest.approx(0.003), "interpolated": True}}
    ranks, estimates = allocate_to_saving(results, cost_at, cost_now, 220)  # cheap alone saves at most 160
    assert ranks == {"cheap": 2, "costly": 7}  # costly at 8 saves 40 more, its next measured rank (2) 160
    assert estimates["costly"]["nsr"] == pytest.approx(0.05 + 0.45 / 6)


def test_a_measured_rank_that_meets_the_saving_exactly_is_not_an_estimate():
    results, cost_at, cost_now = _curve_results()
    assert allocate_to_saving(results, cost_at, cost_now, 120) == ({"cheap": 4, "costly": None}, {})
    assert allocate_to_saving(results, cost_at, cost_now, 0) == ({"cheap": None, "costly": None}, {})


def test_a_saving_no_measured_rank_reaches_is_a_budget_error():
    results, cost_at, cost_now = _curve_results()
    with pytest.raises(BudgetError, match="the measured ranks save at most 320 of the 321 needed"):
        allocate_to_saving(results, cost_at, cost_now, 321)


class _DeepEncoder(TinyEncoder):
    """TinyEncoder with a low-rank-feature MLP after its projection: three Linear layers to allocate among."""

    def __init__(self):
        super().__init__(hidden=32)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, input_ids, attention_mask=None):
        h = super().forward(input_ids, attention_mask).last_hidden_state
        h = h + self.down(torch.tanh(self.up(h)))
        return type(super().forward(input_ids, attention_mask))(last_hidden_state=h)


def _deep_encoder():
    model = low_rank_feature_encoder()
    deep = _DeepEncoder()
    deep.emb.load_state_dict(model.emb.state_dict())
    deep.proj.load_state_dict(model.proj.state_dict())
    return deep


@pytest.mark.parametrize("metric", ["params", "macs"])
def test_a_falor_budget_brings_the_model_to_its_target_with_the_least_cosine_loss(tmp_path, metric):
    from fedcore_adapter.metrics import count_macs, count_params

    model = _deep_encoder()
    node = {"kind": "low_rank", "method": "falor", "allocation": "global", "falor_metric": "cosine",
            "budget": {"metric": metric, "ratio": 0.8}, "grid_points": 6}
    result = run_setup(tiny_setup(node, measure=False), copy.deepcopy(model), TokenDataModule(), output_dir=tmp_path)
    record = _config(result)
    ids = next(iter(TokenDataModule().val_dataloader()))
    count = count_params if metric == "params" else lambda m: count_macs(m, ids)
    before, after = count(model), count(result.model)
    assert 0.78 * before <= after <= 0.8 * before  # met, and not overshot by more than one rank's worth
    assert record["meta"]["budget"] == {"metric": metric, "ratio": 0.8, "value": None}
    assert record["layers"] and all(layer["meta"]["cosine_loss"] >= 0 for layer in record["layers"].values())
    loaded = load_model(result.output_dir / "final", _DeepEncoder())
    torch.testing.assert_close(loaded(**ids).last_hidden_state, result.model(**ids).last_hidden_state)


def test_a_falor_budget_the_measured_ranks_cannot_reach_fails_in_one_line_and_leaves_the_model(tmp_path):
    from fedcore_adapter.errors import NodeError

    model = _deep_encoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # rank 1 everywhere would reach 0.29 of the params; the grid's smallest measured ranks (2 points) only 0.61
    node = {"kind": "low_rank", "method": "falor", "allocation": "global", "budget": {"ratio": 0.4}, "grid_points": 2}
    with pytest.raises(NodeError, match=r"budget cannot be met: the measured ranks save at most \d+ of the \d+ "
                                        r"needed; allowed: a larger budget, or more grid_points") as info:
        run_setup(tiny_setup(node, measure=False), model, TokenDataModule(), output_dir=tmp_path)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
