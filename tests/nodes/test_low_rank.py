"""The low_rank node: real factorised layers, decompose_config, replay, bad input, FedCore names, chains."""
import json

import pytest
import torch
from torch import nn

import fedcore_adapter
from fedcore_adapter import load_model, run_setup
from fedcore_adapter.errors import ConfigError, NodeError
from fedcore_adapter.nodes.low_rank import FactorizedLayer, LowRankConfig
from fedcore_adapter.zoo.datamodules import DigitsDataModule
from fedcore_adapter.zoo.models import DigitsCNN
from tests.conftest import TinyDataModule, tiny_mlp, tiny_setup


def low_rank_mlp(seed: int = 0) -> nn.Module:
    """8 -> 64 -> 64 -> 3 with a rank-4 middle layer (an exact low-rank structure to find)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) / 8)
    return model


def _run(model, *nodes, dm=None, tmp_path, measure=False, **common):
    return run_setup(tiny_setup(*nodes, measure=measure, **common), model, dm or TinyDataModule(), output_dir=tmp_path)


def _config(result, index=1, kind="low_rank"):
    return json.loads((result.output_dir / "nodes" / f"{index}_{kind}" / "decompose_config.json").read_text())


def test_finds_the_exact_rank_and_keeps_the_output(tmp_path):
    model = low_rank_mlp()
    result = _run(model, {"kind": "low_rank", "thresholds": [0.999]}, tmp_path=tmp_path, measure=True)
    layer = result.model[2]
    assert isinstance(layer, FactorizedLayer) and layer.rank == 4
    assert isinstance(result.model[4], nn.Linear)  # 64 -> 3 at full rank 3 would grow: left as it is
    x = torch.randn(5, 8)
    torch.testing.assert_close(result.model(x), model(x), atol=1e-4, rtol=1e-4)
    rows = result.metrics
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["macs"] < rows[0]["macs"]
    assert rows[0]["params"] - rows[1]["params"] >= 64 * 64 - 4 * 128


def test_writes_decompose_config_beside_the_checkpoint(tmp_path):
    result = _run(low_rank_mlp(), {"kind": "low_rank", "thresholds": [0.999]}, tmp_path=tmp_path)
    config = _config(result)
    record = config["layers"]["2"]
    assert record["original"] == {"type": "Linear", "in_features": 64, "out_features": 64, "bias": True}
    assert record["decomposed"]["first"]["out_features"] == 4 and record["rank"] == 4
    assert record["meta"]["energy_kept"] >= 0.999 and record["meta"]["strategy"] == "energy"
    assert record["meta"]["params_after"] == 4 * 128 + 64 < record["meta"]["params_before"]
    assert "4" not in config["layers"]


def test_load_model_and_the_offline_flow_rebuild_the_decomposed_model(tmp_path):
    result = _run(low_rank_mlp(), {"kind": "low_rank", "thresholds": [0.999]}, tmp_path=tmp_path)
    x = torch.randn(4, 8)
    loaded = load_model(result.output_dir / "final", low_rank_mlp(seed=5))
    torch.testing.assert_close(loaded(x), result.model(x))
    node_dir = result.output_dir / "nodes" / "1_low_rank"
    fresh = fedcore_adapter.apply_decompose_config(low_rank_mlp(seed=7), node_dir / "decompose_config.json")
    fresh.load_state_dict(torch.load(node_dir / "state.pt", weights_only=True))
    torch.testing.assert_close(fresh(x), result.model(x))


def test_apply_decompose_config_refuses_a_different_model():
    config = {"format": "fedcore_adapter.decompose_config/1", "method": "svd", "meta": {},
              "layers": {"2": {"original": {"type": "Linear", "in_features": 32, "out_features": 64, "bias": True},
                               "decomposed": {}, "rank": 1, "meta": {}}}}
    with pytest.raises(fedcore_adapter.FedcoreError, match="layer '2' is .* but the config was made from"):
        fedcore_adapter.apply_decompose_config(low_rank_mlp(), config)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("node,message", [
    ({"spectrum_pruning_strategy": "rank", "rank": 16},
     r"node 0:low_rank: rank = 16 is larger than these layers allow: 0 \(at most 8\), 4 \(at most 3\)"),
    ({"budget": {"metric": "params", "ratio": 0.05}},
     r"node 0:low_rank: budget.ratio = 0.05 \(params\) cannot be met: the smallest model reachable has \d+ params"),
])
def test_bad_input_fails_with_one_line_and_leaves_the_model_untouched(tmp_path, node, message):
    model = low_rank_mlp()
    before = _state(model)
    with pytest.raises(NodeError, match=message) as info:
        _run(model, {"kind": "low_rank", **node}, tmp_path=tmp_path)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("node,message", [
    ({"energy_thresholds": [1.5]},
     r"nodes\[0\] \(low_rank\).method.svd.thresholds = \[1.5\]: .*must be in \(0, 1\] \(got 1.5\)"),
    ({"thresholds": [0.0]}, r"must be in \(0, 1\] \(got 0.0\)"),
    ({"spectrum_pruning_strategy": "magic"},
     r"spectrum_pruning_strategy = 'magic': .*'energy', 'explained_variance', 'quantile', 'rank', 'rank_ratio' "
     r"or 'params_ratio'"),
    ({"spectrum_pruning_strategy": "rank"}, r"needs rank: <int>"),
    ({"budget": {"metric": "params"}}, r"give exactly one of ratio .* or value"),
    ({"method": "falor", "budget": {"ratio": 0.5}}, r"budget with method='falor' needs allocation='global'"),
    ({"method": "falor", "allocation": "global", "budget": {"ratio": 0.5}, "nsr_threshold": 0.1},
     r"give budget or nsr_threshold, not both"),
    ({"method": "falor", "falor_refit_kept": True}, r"falor_refit_kept works with falor_fit='sequential' only"),
    ({"method": "falor", "epochs": 2}, r"epochs .* works with method='svd' only"),
    ({"method": "falor", "falor_metric": "cosine"}, r"falor_metric='cosine' needs cosine_loss_threshold"),
    ({"method": "falor", "cosine_loss_threshold": 0.01}, r"cosine_loss_threshold works with falor_metric='cosine'"),
    ({"method": "falor", "falor_metric": "cosine", "cosine_loss_threshold": 0.01, "kl_threshold": 0.1},
     r"kl_threshold works with falor_metric='nsr' only"),
    ({"method": "falor", "falor_fit": "greedy"}, r"falor_fit = 'greedy': .*'projection' or 'sequential'"),
])
def test_invalid_options_name_the_field_and_the_allowed_values(node, message):
    with pytest.raises(ConfigError, match=message) as info:
        fedcore_adapter.load_setup(tiny_setup({"kind": "low_rank", **node}))
    assert "\n" not in str(info.value) and "low_rank" in str(info.value)


def test_accepts_fedcore_low_rank_model_parameters_and_trains_u_s_vh(tmp_path):
    fedcore = {"compression_task": "composite_compression", "common": {"save_each": -1},
               "initial_assumption": ["low_rank_model"],
               "model_params": {"low_rank_model": {
                   "epochs": 2, "learning_rate": 0.001, "hoyer_loss": 0.2, "energy_thresholds": [0.99],
                   "orthogonal_loss": 5, "decomposing_mode": "channel", "spectrum_pruning_strategy": "energy",
                   "finetune_params": {"epochs": 1, "custom_loss": None}}}}
    setup = fedcore_adapter.load_setup(fedcore)
    node = setup.nodes[0]
    assert isinstance(node, LowRankConfig) and node.method.thresholds == [0.99] and node.finetune_params.epochs == 1
    model = low_rank_mlp()
    result = run_setup(fedcore, model, TinyDataModule(), output_dir=tmp_path,
                       overrides={"common": {"measure": False}})
    config = _config(result, 1)
    assert config["layers"]["2"]["meta"]["trained_epochs"] == 2
    assert isinstance(result.model[2], FactorizedLayer) and result.model[2].rank <= 8
    loaded = load_model(result.output_dir / "final", low_rank_mlp(seed=3))
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), result.model(x))


def test_several_thresholds_keep_the_smallest_model_within_tolerance(tmp_path):
    node = {"kind": "low_rank", "thresholds": [0.5, 0.999], "layer_types": ["linear"]}
    loose = _config(_run(low_rank_mlp(), {**node, "selection_tolerance": 1.0}, tmp_path=tmp_path / "a"))
    strict = _config(_run(low_rank_mlp(), {**node, "selection_tolerance": 0.0}, tmp_path=tmp_path / "b"))
    assert [c["threshold"] for c in loose["meta"]["candidates"]] == [0.5, 0.999]
    assert loose["meta"]["chosen_threshold"] == 0.5  # 100 points of tolerance: the smallest wins
    best = max(c["score"] for c in strict["meta"]["candidates"])
    chosen = next(c for c in strict["meta"]["candidates"] if c["threshold"] == strict["meta"]["chosen_threshold"])
    assert chosen["score"] == best


@pytest.mark.parametrize("metric", ["params", "macs"])
def test_global_budget_meets_the_target(tmp_path, metric):
    result = _run(low_rank_mlp(), {"kind": "low_rank", "budget": {"metric": metric, "ratio": 0.6}}, tmp_path=tmp_path,
                  measure=True)
    before, after = result.metrics[0][metric], result.metrics[1][metric]
    assert after <= 0.6 * before
    assert _config(result)["layers"]["2"]["meta"]["strategy"] == "budget"


def test_spatial_mode_turns_a_3x3_conv_into_3x1_then_1x3(tmp_path):
    dm = DigitsDataModule(batch_size=128)
    node = {"kind": "low_rank", "decomposing_mode": "spatial", "spectrum_pruning_strategy": "rank", "rank": 8,
            "include": ["features.3"]}
    result = _run(DigitsCNN(), node, dm=dm, tmp_path=tmp_path, limit_valid_batches=1, limit_test_batches=1)
    layer = result.model.features[3]
    assert layer.first.kernel_size == (3, 1) and layer.second.kernel_size == (1, 3)
    assert sum(p.numel() for p in layer.parameters()) == 8 * (32 * 3 + 64 * 3)
    loaded = load_model(result.output_dir / "final", DigitsCNN())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x), result.model.eval()(x))


def test_a_second_low_rank_node_narrows_the_factorised_layers(tmp_path):
    first = {"kind": "low_rank", "thresholds": [0.999], "layer_types": ["linear"]}
    second = {"kind": "low_rank", "spectrum_pruning_strategy": "rank", "rank": 2, "include": ["2"]}
    result = _run(low_rank_mlp(), first, second, tmp_path=tmp_path)
    assert result.model[2].rank == 2
    record = _config(result, 2)["layers"]["2"]
    assert record["original"]["type"] == "FactorizedLayer" and record["rank"] == 2
    loaded = load_model(result.output_dir / "final", low_rank_mlp(seed=1))
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), result.model(x))


def test_ranks_do_not_depend_on_the_thread_count(tmp_path):
    ranks = []
    previous = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            config = _config(_run(low_rank_mlp(), {"kind": "low_rank", "thresholds": [0.8]},
                                  tmp_path=tmp_path / str(threads)))
        finally:
            torch.set_num_threads(previous)
        ranks.append({name: r["rank"] for name, r in config["layers"].items()})
    assert ranks[0] == ranks[1] and ranks[0]


class _RecordingExecutor:
    def __init__(self):
        self.functions = []

    def map(self, fn, items):
        self.functions.append(getattr(fn, "__name__", getattr(getattr(fn, "func", None), "__name__", "")))
        return [fn(item) for item in items]


def test_per_layer_measurements_go_through_the_executor(tmp_path):
    executor = _RecordingExecutor()
    run_setup(tiny_setup({"kind": "low_rank"}, measure=False), low_rank_mlp(), TinyDataModule(), output_dir=tmp_path,
              executor=executor)
    assert "rank_sensitivity" in executor.functions


@pytest.mark.parametrize("strategy,threshold,check", [
    ("energy", 0.999, lambda rec: rec["rank"] == 4),  # the exact rank of the middle layer
    ("explained_variance", 0.999, lambda rec: rec["rank"] == 4 and rec["meta"]["explained_variance_kept"] >= 0.999),
    ("quantile", 0.9, lambda rec: rec["rank"] <= 7),  # singular values above the 90% quantile of 64
    ("rank_ratio", 0.25, lambda rec: rec["rank"] == 16),
    ("params_ratio", 0.3, lambda rec: rec["meta"]["params_after"] <= 0.3 * rec["meta"]["params_before"]
     < rec["meta"]["params_after"] + 128),  # the largest rank within 30% of the parameters
])
def test_every_strategy_runs_in_the_node_and_the_result_reloads(tmp_path, strategy, threshold, check):
    result = _run(low_rank_mlp(),
                  {"kind": "low_rank", "spectrum_pruning_strategy": strategy, "thresholds": [threshold]},
                  tmp_path=tmp_path, measure=True)
    record = _config(result)["layers"]["2"]
    assert record["meta"]["strategy"] == strategy and record["meta"]["threshold"] == threshold
    assert check(record) and result.model[2].rank == record["rank"]
    assert result.metrics[1]["params"] < result.metrics[0]["params"]
    x = torch.randn(4, 8)
    torch.testing.assert_close(load_model(result.output_dir / "final", low_rank_mlp(seed=2))(x), result.model(x))


def test_apply_decompose_config_checks_every_layer_before_changing_any():
    result_config = {"format": "fedcore_adapter.decompose_config/1", "method": "svd", "meta": {}, "layers": {
        "2": {"original": {"type": "Linear", "in_features": 64, "out_features": 64, "bias": True},
              "decomposed": {"type": "FactorizedLayer", "kind": "linear", "mode": "channel",
                             "first": {"type": "Linear", "in_features": 64, "out_features": 4, "bias": False},
                             "second": {"type": "Linear", "in_features": 4, "out_features": 64, "bias": True}},
              "rank": 4, "meta": {}},
        "4": {"original": {"type": "Linear", "in_features": 64, "out_features": 10, "bias": True},
              "decomposed": {}, "rank": 1, "meta": {}}}}
    model = low_rank_mlp()
    with pytest.raises(fedcore_adapter.FedcoreError, match="layer '4' is .* but the config was made from") as info:
        fedcore_adapter.apply_decompose_config(model, result_config)
    assert "\n" not in str(info.value)
    assert isinstance(model[2], nn.Linear)  # the good first record was not applied either


class _TrxModel(nn.Module):
    """ptls's own TrxEncoder (an mcc embedding and amounts) and a linear head, fed ptls PaddedBatch batches."""

    def __init__(self):
        super().__init__()
        from ptls.nn import TrxEncoder

        torch.manual_seed(0)
        self.trx = TrxEncoder(embeddings={"mcc": {"in": 200, "out": 64}}, numeric_values={"amount": "identity"})
        self.head = nn.Linear(self.trx.output_size, 3)

    def forward(self, events):
        return self.head(self.trx(events).payload.mean(1))


class _TrxData:
    @staticmethod
    def _events(seed: int):
        from ptls.data_load.padded_batch import PaddedBatch

        g = torch.Generator().manual_seed(seed)
        payload = {"mcc": torch.randint(0, 260, (16, 20), generator=g), "amount": torch.randn(16, 20, generator=g)}
        return PaddedBatch(payload, torch.randint(5, 21, (16,), generator=g))

    def train_dataloader(self):
        return [(self._events(i), torch.randint(0, 3, (16,))) for i in range(2)]

    def val_dataloader(self):
        return [(self._events(10 + i), torch.randint(0, 3, (16,))) for i in range(2)]


def test_a_factorised_embedding_still_reads_as_an_nn_embedding_to_ptls_trx_encoder(tmp_path):
    node = {"kind": "low_rank", "layer_types": ["embedding"],
            "method": {"name": "svd", "spectrum_pruning_strategy": "rank", "rank": 8}}
    result = run_setup(tiny_setup(node, measure=False), _TrxModel(), _TrxData(), output_dir=tmp_path)
    trx = result.model.trx
    embedding = trx.embeddings["mcc"]
    assert isinstance(embedding, FactorizedLayer) and embedding.rank == 8
    assert (embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx) == (200, 64, 0)
    assert trx.category_max_size == {"mcc": 200} and trx.output_size == 65
    # mcc ids up to 259: TrxEncoder clips them to num_embeddings - 1, which it reads from the factorised layer
    assert result.model(_TrxData._events(5)).shape == (16, 3)
    with torch.no_grad():
        assert float(embedding(torch.tensor([0])).abs().max()) < 1e-6  # the padding row stays (numerically) zero
    with pytest.raises(AttributeError, match="num_embeddings"):  # only an embedding has it
        _ = FactorizedLayer(nn.Linear(4, 2), nn.Linear(2, 4), "linear").num_embeddings


@pytest.mark.parametrize("method", [{"name": "svd", "epochs": 1}, {"name": "falor"}])
def test_a_node_with_no_layer_to_factorise_says_so_and_the_run_continues(tmp_path, method):
    model = tiny_mlp()
    nodes = [{"kind": "low_rank", "layer_types": ["embedding"], "method": method}, {"kind": "training", "epochs": 1}]
    result = run_setup(tiny_setup(*nodes, measure=True), model, TinyDataModule(), output_dir=tmp_path)
    row = next(r for r in result.metrics if r["kind"] == "low_rank")
    assert row["note"].startswith("no layer to factorise: none of the model's layers is a embedding layer")
    assert row["params"] == result.metrics[0]["params"]  # the model left as it is
    record = _config(result)
    assert record["layers"] == {} and record["meta"]["skipped"] == row["note"]
    assert [r["kind"] for r in result.metrics] == ["input", "low_rank", "training"]
