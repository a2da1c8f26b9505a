"""Activation-aware (falor) decomposition: output covariance, NSR-bounded ranks, unlabeled dict batches."""
import json

import pytest
import torch
from torch import nn

from fedcore_adapter import load_model, run_setup
from fedcore_adapter.nodes.low_rank.calibration import collect_output_covariances, input_statistics
from fedcore_adapter.nodes.low_rank.falor import FalorResult, allocate_nsr, noise_to_signal, top_eigenvectors
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
    return run_setup(tiny_setup({"kind": "low_rank", "method": "falor", **node}, measure=False), low_rank_feature_encoder(),
                     TokenDataModule(), output_dir=tmp_path)


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
        result = run_setup(tiny_setup({"kind": "low_rank", "method": "falor", "nsr_threshold": nsr}, measure=False), model,
                           TokenDataModule(), output_dir=tmp_path / str(i))
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


def test_output_covariance_excludes_the_bias_and_input_covariance_matches_torch():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(64, 3)
    cov = collect_output_covariances(layer, [x], ["0"])["0"]
    y = (x @ layer[0].weight.T).double()
    torch.testing.assert_close(cov, torch.cov(y.T, correction=0))
    stats = input_statistics(layer, [x], {"0": "channel"})["0"]
    torch.testing.assert_close(stats, torch.cov(x.double().T, correction=0))


@pytest.mark.text
def test_falor_on_minilm_keeps_sentence_embeddings_close(tmp_path):
    from fedcore_adapter.zoo.text import TextDataModule, embedding_cosine, load_minilm

    model = load_minilm()
    dm = TextDataModule(n_train=8, n_val=32, n_test=16, batch_size=16, max_length=32)
    node = {"kind": "low_rank", "method": "falor", "nsr_threshold": 0.01, "include": ["encoder.layer.5.output.dense"]}
    result = run_setup(tiny_setup(node, measure=False, limit_valid_batches=2), model, dm, output_dir=tmp_path)
    record = _config(result)["layers"]["encoder.layer.5.output.dense"]
    assert record["meta"]["nsr"] < 0.01 and record["rank"] < 307  # 307: the largest rank that saves params
    assert embedding_cosine(model, result.model, dm.test_dataloader())["mean_cosine"] > 0.95  # unseen sentences
    loaded = load_model(result.output_dir / "final", load_minilm())
    batch = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(loaded(**batch).last_hidden_state, result.model(**batch).last_hidden_state)


def test_output_covariance_of_a_1x1_conv_is_over_channels_at_every_pixel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    x = torch.randn(2, 3, 5, 5)
    cov = collect_output_covariances(model, [x], ["0"])["0"]
    y = torch.einsum("oc,bchw->bhwo", model[0].weight[:, :, 0, 0], x).reshape(-1, 4).double()
    torch.testing.assert_close(cov, torch.cov(y.T.detach(), correction=0))
