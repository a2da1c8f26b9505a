"""Structured pruning across architectures: what is removed, what is kept (with a warning), and exact replay."""
import copy
import warnings

import pytest
import torch
from torch import nn

from fedcore_adapter.errors import NodeError
from fedcore_adapter.nodes.pruning import PruningWarning
from fedcore_adapter.nodes.pruning.backend import make_pruner
from fedcore_adapter.nodes.pruning.history import History, replay_pruning


def prune(model: nn.Module, inputs, ratio=0.5, **options) -> tuple[nn.Module, History]:
    """Prune a copy of ``model`` in one step; returns it and its history."""
    work = copy.deepcopy(model).eval()
    history = History()
    make_pruner(work, inputs, label="t", ratio=ratio, **options).step(history, 1)
    return work, history


def call(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return getattr(out, "last_hidden_state", out)


def assert_replays(make, pruned: nn.Module, history: History, inputs) -> None:
    """A fresh model + the history + the pruned weights computes exactly what the pruned model does."""
    fresh = replay_pruning(make(), history.to_json())
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    torch.testing.assert_close(call(fresh.eval(), inputs), call(pruned, inputs))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Conv2dResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(torch.relu(x + self.block(x)).mean((2, 3)))


class SeqEncoder(nn.Module):
    """Embedding -> Linear -> recurrent layer -> classifier on the last step."""

    def __init__(self, rnn: str = "lstm", **rnn_options):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.proj = nn.Linear(8, 12)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[rnn](12, 16, batch_first=True, **rnn_options)
        self.head = nn.Linear(16 * (2 if rnn_options.get("bidirectional") else 1), 3)

    def forward(self, ids):
        out, _ = self.rnn(torch.relu(self.proj(self.emb(ids))))
        return self.head(out[:, -1])


class LowRankRaw(nn.Module):
    """A custom layer holding raw parameters (``x V^T U^T``), which torch-pruning has no function for."""

    def __init__(self, n: int, rank: int):
        super().__init__()
        self.U = nn.Parameter(torch.randn(n, rank) * 0.1)
        self.V = nn.Parameter(torch.randn(rank, n) * 0.1)

    def forward(self, x):
        return x @ self.V.t() @ self.U.t()


def seeded(make):
    def build():
        torch.manual_seed(0)
        return make()
    return build


IDS = torch.randint(0, 30, (3, 5))


@pytest.mark.parametrize("make, inputs, pruned_layer, attr, before", [
    (seeded(Conv2dResNet), torch.randn(2, 3, 6, 6), "block.0", "out_channels", 16),
    (seeded(lambda: nn.Sequential(nn.Conv1d(1, 8, 5), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(8 * 34, 3))), torch.randn(2, 1, 40), "0", "out_channels", 8),
    (seeded(lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))),
     torch.randn(2, 6), "2", "out_features", 16),
    (seeded(SeqEncoder), IDS, "rnn", "hidden_size", 16),
])
def test_channels_are_removed_and_the_history_replays_exactly(make, inputs, pruned_layer, attr, before):
    model = make()
    pruned, history = prune(model, inputs)
    assert getattr(pruned.get_submodule(pruned_layer), attr) == before // 2
    assert n_params(pruned) < n_params(model)
    assert call(pruned, inputs).shape == call(model.eval(), inputs).shape
    assert_replays(make, pruned, history, inputs)


@pytest.mark.parametrize("make, inputs, layer, kind, coupled", [
    (seeded(lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), LowRankRaw(8, 2), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                  nn.Linear(8, 2))), torch.randn(2, 6), "2", "LowRankRaw", "0"),
])
def test_layers_torch_pruning_cannot_handle_are_kept_whole_with_a_warning_naming_them(make, inputs, layer, kind,
                                                                                     coupled):
    model = make()
    with pytest.warns(PruningWarning, match=rf"cannot prune layer '{layer}' \({kind}\); it is kept whole, with the "
                                            rf"channels coupled to it \({coupled}\)"):
        pruned, history = prune(model, inputs)
    assert [p.shape for p in pruned.get_submodule(layer).parameters()] == \
        [p.shape for p in model.get_submodule(layer).parameters()]
    assert pruned.get_submodule(coupled).out_features == model.get_submodule(coupled).out_features
    assert call(pruned, inputs).shape == call(model.eval(), inputs).shape
    assert_replays(make, pruned, history, inputs)


def test_the_layer_after_an_unsupported_one_is_still_pruned():
    make = seeded(lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), LowRankRaw(8, 2), nn.ReLU(), nn.Linear(8, 8),
                                        nn.ReLU(), nn.Linear(8, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        pruned, _ = prune(make(), torch.randn(2, 6))
    assert pruned[4].out_features == 4


def test_torch_transformer_encoder_loses_ffn_channels_and_keeps_its_heads():
    make = seeded(lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2,
                                                enable_nested_tensor=False))
    x = torch.randn(2, 5, 16)
    with pytest.warns(PruningWarning, match="heads of nn.MultiheadAttention are kept"):
        pruned, history = prune(make(), x)
    assert [layer.linear1.out_features for layer in pruned.layers] == [16, 16]
    assert pruned.layers[0].self_attn.num_heads == 4
    assert_replays(make, pruned, history, x)


@pytest.fixture
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, attn_implementation="eager")

    def make():
        torch.manual_seed(0)
        return transformers.BertModel(config).eval()

    return make


BERT_INPUTS = {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def test_bert_heads_and_ffn_channels_are_removed_with_the_hidden_size_kept(tiny_bert):
    model = tiny_bert()
    pruned, history = prune(model, BERT_INPUTS, ratio=0.5)
    for layer in pruned.encoder.layer:
        att = layer.attention.self
        assert (att.num_attention_heads, att.all_head_size, att.query.out_features) == (2, 16, 16)
        assert layer.attention.output.dense.in_features == 16 and layer.attention.output.dense.out_features == 32
        assert layer.intermediate.dense.out_features == 32 and layer.output.dense.in_features == 32
    assert call(pruned, BERT_INPUTS).shape == (2, 7, 32)
    assert_replays(tiny_bert, pruned, history, BERT_INPUTS)


def test_bert_head_ratio_per_layer_and_global_ranking(tiny_bert):
    pruned, _ = prune(tiny_bert(), BERT_INPUTS, ratio={"encoder.layer.1.attention": 0.75})
    heads = [layer.attention.self.num_attention_heads for layer in pruned.encoder.layer]
    ffn = [layer.intermediate.dense.out_features for layer in pruned.encoder.layer]
    assert heads == [4, 1] and ffn == [64, 64]
    pruned, _ = prune(tiny_bert(), BERT_INPUTS, ratio=0.5, head_ratio=0.25, global_pruning=True)
    assert sum(layer.attention.self.num_attention_heads for layer in pruned.encoder.layer) == 6
    assert sum(layer.intermediate.dense.out_features for layer in pruned.encoder.layer) == 64
    assert all(layer.attention.self.num_attention_heads >= 1 for layer in pruned.encoder.layer)


def test_bert_taylor_importance_removes_the_head_without_gradient(tiny_bert):
    """Head 3 of layer 0 has the largest weights but zero gradient: Taylor removes exactly it."""
    model = tiny_bert()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    att, out = model.encoder.layer[0].attention.self, model.encoder.layer[0].attention.output.dense
    with torch.no_grad():
        for layer in (att.query, att.key, att.value):
            layer.weight[24:].mul_(10.0)
            layer.weight.grad[24:], layer.bias.grad[24:] = 0.0, 0.0
        out.weight.grad[:, 24:] = 0.0
    history = History()
    make_pruner(model, BERT_INPUTS, label="t", ratio=0.25, importance="taylor").step(history, 1)
    removed = next(op["idxs"] for op in history.ops if op["module"] == "encoder.layer.0.attention.self.query")
    assert removed == list(range(24, 32))


def test_bert_ignored_layers_stay_whole_and_unknown_names_are_one_line_errors(tiny_bert):
    pruned, _ = prune(tiny_bert(), BERT_INPUTS, ratio=0.5, ignored_layers=("encoder.layer.1",))
    assert [layer.attention.self.num_attention_heads for layer in pruned.encoder.layer] == [2, 4]
    assert [layer.intermediate.dense.out_features for layer in pruned.encoder.layer] == [32, 64]
    model = tiny_bert()
    with pytest.raises(NodeError, match=r"node t: ignored_layers names layer 'encoder\.layer\.9', which the model "
                                        r"does not have; prunable groups: encoder\.layer\.0\.attention"):
        make_pruner(model, BERT_INPUTS, label="t", ratio=0.5, ignored_layers=("encoder.layer.9",))


def test_iterative_bert_pruning_reaches_the_ratio_at_the_last_step(tiny_bert):
    model = tiny_bert()
    pruner = make_pruner(model, BERT_INPUTS, label="t", ratio=0.5, steps=2)
    history = History()
    pruner.step(history, 1)
    assert model.encoder.layer[0].attention.self.num_attention_heads == 3
    pruner.step(history, 2)
    assert model.encoder.layer[0].attention.self.num_attention_heads == 2
    assert_replays(tiny_bert, model, history, BERT_INPUTS)


@pytest.mark.text
def test_minilm_pruned_in_a_setup_keeps_its_hidden_size_and_reloads_exactly(tmp_path):
    from fedcore_adapter import load_model, run_setup
    from fedcore_adapter.zoo.text import TextDataModule, load_minilm

    dm = TextDataModule(n_train=16, n_val=8, n_test=8, batch_size=8, max_length=24)
    result = run_setup({"name": "M", "common": {"latency_repeats": 2, "latency_warmup": 1},
                        "nodes": [{"kind": "pruning", "pruning_ratio": 0.5}]}, load_minilm(), dm, output_dir=tmp_path)
    layers = result.model.encoder.layer
    assert [layer.attention.self.num_attention_heads for layer in layers] == [6] * 6
    assert [layer.intermediate.dense.out_features for layer in layers] == [768] * 6
    before, after = result.metrics
    assert after["macs"] < 0.7 * before["macs"] and after["params"] < before["params"]
    batch = {k: v[:2] for k, v in next(iter(dm.test_dataloader())).items()}
    reloaded = load_model(result.output_dir, load_minilm())
    torch.testing.assert_close(call(reloaded, batch), call(result.model.eval(), batch))
    assert call(reloaded, batch).shape[-1] == 384
