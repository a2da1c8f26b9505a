"""Low-rank in chains: before and after structured pruning (COMPOSITE_2), and before int8 quantization."""
import pytest
import torch

from fedcore_adapter import load_model, run_setup
from fedcore_adapter.nodes.low_rank import FactorizedLayer
from tests.conftest import TinyDataModule, tiny_setup
from tests.nodes.test_low_rank import low_rank_mlp

LOW_RANK = {"kind": "low_rank", "thresholds": [0.999], "layer_types": ["linear"]}
PRUNING = {"kind": "pruning", "pruning_ratio": 0.5, "epochs": 0}


def _run(tmp_path, *nodes):
    return run_setup(tiny_setup(*nodes, measure=False), low_rank_mlp(), TinyDataModule(), output_dir=tmp_path)


def _reloads(result):
    loaded = load_model(result.output_dir / "final", low_rank_mlp(seed=9))
    x = torch.randn(6, 8)
    torch.testing.assert_close(loaded(x), result.model.eval()(x))


def test_pruning_a_decomposed_model_narrows_its_factor_layers_and_reloads(tmp_path):
    result = _run(tmp_path, LOW_RANK, PRUNING)
    layer = result.model[2]
    assert isinstance(layer, FactorizedLayer)
    assert layer.second.out_features < 64  # pruning removed neurons behind the factorised layer
    _reloads(result)  # low-rank replay (shapes at decomposition time), then pruning's replay


def test_low_rank_after_pruning_and_again_after_it(tmp_path):
    result = _run(tmp_path, PRUNING, LOW_RANK, PRUNING, {**LOW_RANK, "thresholds": [0.9]})
    assert any(isinstance(m, FactorizedLayer) for m in result.model.modules())
    _reloads(result)


def test_dynamic_int8_quantization_after_low_rank_quantizes_the_factor_layers(tmp_path):
    result = run_setup(tiny_setup(LOW_RANK, {"kind": "ptq_dynamic"}), low_rank_mlp(), TinyDataModule(),
                       output_dir=tmp_path)
    layer = result.model[2]
    assert isinstance(layer, FactorizedLayer)
    assert layer.first.weight().dtype == torch.qint8 and layer.second.weight().dtype == torch.qint8
    assert result.metrics[-1]["dtype"].startswith("int8")
    _reloads(result)


def test_pruning_keeps_the_inner_rank_of_a_factorised_output_layer(tmp_path):
    """The output layer is never narrowed; factorised, it is still one layer: its rank stays too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(32, 4) @ torch.randn(4, 64) / 8)  # rank 4: decomposed
    decomposed = run_setup(tiny_setup(LOW_RANK, measure=False), model, TinyDataModule(), output_dir=tmp_path / "a")
    assert isinstance(decomposed.model[2], FactorizedLayer) and decomposed.model[2].rank == 4
    pruned = run_setup(tiny_setup(PRUNING, measure=False), decomposed.model, TinyDataModule(),
                       output_dir=tmp_path / "b").model
    assert pruned[0].out_features == 32  # the hidden layer lost half its neurons
    assert pruned[2].rank == 4 and pruned[2].second.out_features == 32


def test_heads_and_ffn_channels_of_a_decomposed_transformer_are_pruned_inside_its_factor_pairs():
    """COMPOSITE_2 on an encoder: pruning after low-rank finds the heads and FFN channels in the factors."""
    transformers = pytest.importorskip("transformers")
    from fedcore_adapter.nodes.pruning.backend import make_pruner
    from fedcore_adapter.nodes.pruning.history import History

    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    block = model.encoder.layer[0]

    def factorise(linear, rank=8):
        first = torch.nn.Linear(linear.in_features, rank, bias=False)
        second = torch.nn.Linear(rank, linear.out_features)
        return FactorizedLayer(first, second, kind="linear")

    block.attention.self.query = factorise(block.attention.self.query)
    block.intermediate.dense = factorise(block.intermediate.dense)
    block.output.dense = factorise(block.output.dense)
    inputs = {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    make_pruner(model, inputs, label="t", ratio=0.5).step(History(), 1)
    assert block.attention.self.num_attention_heads == 2 and block.attention.self.query.second.out_features == 16
    assert block.attention.self.query.rank == 8  # the rank is the low-rank node's business
    assert block.intermediate.dense.second.out_features == 32 and block.output.dense.first.in_features == 32
    with torch.no_grad():
        assert model(**inputs).last_hidden_state.shape == (2, 7, 32)
