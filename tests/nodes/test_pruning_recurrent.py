"""Recurrent layers lose hidden units for real, in plain torch models and in real pytorch-lifestream modules."""
import copy
import warnings
from functools import partial

import pytest
import torch
from torch import nn

from fedcore_adapter import load_model
from fedcore_adapter.checkpoint import save_checkpoint
from fedcore_adapter.context import NodeContext
from fedcore_adapter.nodes.pruning import PruningConfig, PruningWarning
from fedcore_adapter.nodes.pruning.backend import example_inputs, make_pruner
from fedcore_adapter.nodes.pruning.history import History, replay_pruning
from fedcore_adapter.nodes.pruning.node import apply_pruning
from fedcore_adapter.nodes.pruning.recurrent import RecurrentPruner
from fedcore_adapter.schema import CommonConfig
from fedcore_adapter.structure import transform_record

ptls = pytest.importorskip("ptls")
torchmetrics = pytest.importorskip("torchmetrics")
from ptls.data_load.padded_batch import PaddedBatch  # noqa: E402
from ptls.frames.coles import CoLESModule  # noqa: E402
from ptls.frames.supervised import SequenceToTarget  # noqa: E402
from ptls.nn import Head, RnnSeqEncoder, TrxEncoder  # noqa: E402

RNNS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SeqModel(nn.Module):
    """Embedding -> Linear -> recurrent layer -> classifier on the last step."""

    def __init__(self, rnn: str = "gru", hidden: int = 16, **options):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.proj = nn.Linear(8, 12)
        self.rnn = RNNS[rnn](12, hidden, batch_first=True, **options)
        self.head = nn.Linear(hidden * (2 if options.get("bidirectional") else 1), 3)

    def forward(self, ids):
        out, _ = self.rnn(torch.relu(self.proj(self.emb(ids))))
        return self.head(out[:, -1])


IDS = torch.randint(0, 30, (3, 5))


def seeded(make, *args, **kwargs):
    def build():
        torch.manual_seed(0)
        return make(*args, **kwargs)
    return build


def prune(model: nn.Module, inputs, ratio=0.5) -> tuple[nn.Module, History]:
    work = copy.deepcopy(model).eval()
    history = History()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningWarning)  # nothing may be left whole
        make_pruner(work, inputs, label="t", ratio=ratio).step(history, 1)
    return work, history


# -- the pruning function ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, dead_gate_bias", [("gru", ("z", 1e4)), ("lstm", ("o", -1e4))])
def test_removing_a_silent_hidden_unit_leaves_every_other_output_unchanged_in_all_layers_and_directions(
        kind, dead_gate_bias):
    """Unit 2 never opens (GRU update gate shut with h0 = 0, LSTM output gate shut) in every layer and direction:
    removing it from every gate, the recurrent columns and the next layer's inputs changes nothing else."""
    torch.manual_seed(0)
    hidden, layer = 5, RNNS[kind](4, 5, num_layers=2, bidirectional=True, batch_first=True)
    gate, bias = dead_gate_bias
    row = {"z": 1, "o": 3}[gate] * hidden + 2
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("weight_"):
                p[row].zero_()
            elif name.startswith("bias_ih"):
                p[row].fill_(bias)
    x = torch.randn(2, 6, 4)
    with torch.no_grad():
        full, _ = layer(x)
        small = RecurrentPruner().prune_out_channels(copy.deepcopy(layer), [2, hidden + 2])
        out, _ = small(x)
    assert small.hidden_size == 4
    assert small.weight_ih_l1.shape == (small.weight_ih_l1.shape[0], 8)  # next layer's inputs: 2 x 4 units
    keep = [0, 1, 3, 4, 5, 6, 8, 9]
    torch.testing.assert_close(out, full[..., keep])


def test_bidirectional_layers_lose_the_same_units_in_both_directions():
    with pytest.raises(ValueError, match="same hidden units in both directions"):
        RecurrentPruner().prune_out_channels(nn.GRU(4, 5, bidirectional=True), [1, 5 + 2])


# -- through torch-pruning's graph ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("options", [{}, {"num_layers": 2}, {"bidirectional": True},
                                     {"num_layers": 2, "bidirectional": True}])
def test_every_recurrent_layer_loses_half_its_hidden_units_and_the_history_replays_exactly(kind, options):
    make = seeded(SeqModel, kind, 16, **options)
    model = make()
    pruned, history = prune(model, IDS)
    assert pruned.rnn.hidden_size == 8
    assert pruned.head.in_features == model.head.in_features // 2
    assert n_params(pruned.rnn) < 0.5 * n_params(model.rnn)
    fresh = replay_pruning(make(), history.to_json())
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(IDS), pruned(IDS))


def test_an_lstm_with_proj_size_is_kept_whole_with_a_warning_naming_it():
    model = seeded(SeqModel, "lstm", 16, proj_size=4)()
    model.head = nn.Linear(4, 3)
    with pytest.warns(PruningWarning, match=r"cannot prune layer 'rnn' \(LSTM\); it is kept whole"):
        make_pruner(copy.deepcopy(model), IDS, label="t", ratio=0.5).step(History(), 1)


# -- real pytorch-lifestream modules ---------------------------------------------------------------------
def trx_batch(n=6, length=9, seed=1) -> PaddedBatch:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, length + 1, (n,), generator=g)
    return PaddedBatch({"mcc": torch.randint(1, 20, (n, length), generator=g),
                        "amount": torch.randn(n, length, generator=g)}, lens)


def rnn_seq_encoder(kind="gru", hidden=32, projection=0, **options) -> RnnSeqEncoder:
    trx = TrxEncoder(embeddings={"mcc": {"in": 20, "out": 8}}, numeric_values={"amount": "identity"},
                     linear_projection_size=projection)
    return RnnSeqEncoder(trx_encoder=trx, hidden_size=hidden, type=kind, **options)


def seq_to_target(kind="gru", seed=0, **options) -> SequenceToTarget:
    torch.manual_seed(seed)
    encoder = rnn_seq_encoder(kind, **options)
    width = encoder.embedding_size * (2 if options.get("bidir") else 1)
    return SequenceToTarget(encoder, head=nn.Linear(width, 3), loss=nn.CrossEntropyLoss(),
                            metric_list=torchmetrics.Accuracy(task="multiclass", num_classes=3),
                            optimizer_partial=partial(torch.optim.Adam, lr=1e-3),
                            lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=1))


def coles(seed=0) -> CoLESModule:
    torch.manual_seed(seed)
    encoder = rnn_seq_encoder("gru", projection=16)
    return CoLESModule(encoder, head=Head(use_norm_encoder=True),
                       optimizer_partial=partial(torch.optim.Adam, lr=1e-3),
                       lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=1))


def run_pruning_node(model: nn.Module, tmp_path, ratio=0.5) -> tuple[nn.Module, list]:
    """The pruning node on (PaddedBatch, target) batches; returns the pruned model and its structure records."""
    records = []
    loader = [(trx_batch(), torch.tensor([0, 1, 2, 0, 1, 2]))]
    ctx = NodeContext(train_loader=loader, val_loader=loader, test_loader=None, loss_fn=None,
                      device=torch.device("cpu"), teacher=model, output_dir=tmp_path / "work", common=CommonConfig(),
                      node_label="0:pruning",
                      structure_recorder=lambda name, data: records.append(transform_record(name, data)))
    return apply_pruning(model, PruningConfig(pruning_ratio=ratio), ctx), records


def assert_reloads(make, pruned: nn.Module, records: list, tmp_path) -> nn.Module:
    """Saved in the checkpoint format, ``load_model`` on a freshly built module computes the same outputs."""
    save_checkpoint(pruned, tmp_path / "ckpt", records)
    loaded = load_model(tmp_path / "ckpt", make())
    x = trx_batch(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned.eval()(x))
    return loaded


def gru_params(model: nn.Module) -> int:
    return sum(n_params(m) for m in model.modules() if isinstance(m, nn.RNNBase))


@pytest.mark.parametrize("kind, options", [("gru", {}), ("lstm", {}), ("gru", {"num_layers": 2, "bidir": True})])
def test_a_ptls_sequence_to_target_with_torchmetrics_loses_half_its_hidden_units_and_reloads(kind, options,
                                                                                              tmp_path):
    """The torchmetrics metrics (custom ``__eq__``) no longer hide every layer from the graph; the GRU's trainable
    initial state (``starter_h``) and the head's inputs lose the same units; ``load_model`` rebuilds it exactly."""
    model = seq_to_target(kind, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningWarning)
        pruned, records = run_pruning_node(model, tmp_path)
    encoder = pruned.seq_encoder.seq_encoder
    assert encoder.rnn.hidden_size == 16
    assert encoder.starter_h.shape[-1] == 16
    assert encoder.hidden_size == pruned.seq_encoder.embedding_size == 16  # ptls's own size attributes follow
    assert pruned.head.in_features == model.head.in_features // 2
    assert gru_params(pruned) <= 0.5 * gru_params(model)
    metric = pruned.valid_metrics["MulticlassAccuracy"]
    assert type(metric) is type(model.valid_metrics["MulticlassAccuracy"])  # its own class (and __eq__) again
    assert pruned(trx_batch()).shape == (6, 3)
    loaded = assert_reloads(partial(seq_to_target, kind, seed=5, **options), pruned, records, tmp_path)
    assert loaded.seq_encoder.embedding_size == 16


def test_a_ptls_coles_encoder_keeps_its_embedding_size_loses_its_projection_channels_and_reloads(tmp_path):
    """A CoLES module's output is the GRU's hidden state (the embedding): its size stays, the transaction
    projection feeding the GRU loses half its channels with the GRU's matching inputs."""
    model = coles()
    pruned, records = run_pruning_node(model, tmp_path)
    rnn = pruned.seq_encoder.seq_encoder.rnn
    assert (rnn.hidden_size, rnn.input_size) == (32, 8)
    assert pruned.seq_encoder.trx_encoder.linear_projection_head.out_features == 8
    assert pruned(trx_batch()).shape == (6, 32)
    assert_reloads(partial(coles, seed=3), pruned, records, tmp_path)


def test_example_inputs_are_a_few_sequences_of_a_padded_batch():
    inputs = example_inputs([(trx_batch(), torch.zeros(6))], torch.device("cpu"))
    assert isinstance(inputs, PaddedBatch) and len(inputs) == 2
    assert inputs.payload["mcc"].shape == (2, 9)


class PaddedBlock(nn.Module):
    """A custom layer holding raw parameters, called with and returning a PaddedBatch."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: PaddedBatch) -> PaddedBatch:
        return PaddedBatch(x.payload * self.scale, x.seq_lens)


class PaddedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.trx = TrxEncoder(embeddings={"mcc": {"in": 20, "out": 8}}, numeric_values={"amount": "identity"},
                              linear_projection_size=12)
        self.block = PaddedBlock(12)
        self.mid = nn.Linear(12, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: PaddedBatch):
        h = self.block(self.trx(x)).payload
        return self.head(torch.relu(self.mid(h)).mean(1))


def test_tracing_reaches_through_a_layer_called_with_a_padded_batch():
    """A kept-whole layer taking a PaddedBatch is linked to its producer: the layers coupled to it are named and
    kept, the ones after it are pruned."""
    make = seeded(PaddedModel)
    with pytest.warns(PruningWarning, match=r"layer 'block' \(PaddedBlock\); it is kept whole, with the channels "
                                            r"coupled to it \(trx.linear_projection_head\)"):
        pruned, history = prune_padded(make())
    assert pruned.mid.out_features == 8 and pruned.trx.linear_projection_head.out_features == 12
    fresh = replay_pruning(make(), history.to_json())
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(trx_batch()), pruned(trx_batch()))


def prune_padded(model):
    work, history = copy.deepcopy(model).eval(), History()
    make_pruner(work, trx_batch(), label="t", ratio=0.5).step(history, 1)
    return work, history


# -- through the engine, on a PtlsDataModule ------------------------------------------------------------
def test_a_ptls_classifier_pruned_then_int8_through_a_setup_is_measured_smaller_and_reloads_exactly(tmp_path):
    """pruning (a fine-tune epoch on the module's own objective) then ptq_dynamic on a SequenceToTarget and a
    PtlsDataModule: the GRU loses half its units, then runs in int8; ``load_model`` rebuilds the result."""
    from fedcore_adapter import run_setup
    from tests.ptls_helpers import seq_to_target as ptls_classifier
    from tests.ptls_helpers import target_data

    setup = {"name": "P", "common": {"latency_repeats": 2, "latency_warmup": 1},
             "nodes": [{"kind": "pruning", "pruning_ratio": 0.5, "epochs": 1},
                       {"kind": "ptq_dynamic"}]}
    dm = target_data()
    result = run_setup(setup, ptls_classifier(hidden=128), dm, output_dir=tmp_path)
    first, pruned, quantized = result.metrics
    assert pruned["params"] < 0.5 * first["params"]
    assert quantized["size_mb"] < pruned["size_mb"] / 2 and quantized["dtype"].startswith("int8")
    assert type(result.model.seq_encoder.seq_encoder.rnn).__name__ == "DynamicInt8GRU"
    assert result.model.seq_encoder.seq_encoder.rnn.hidden_size == 64
    loaded = load_model(result.output_dir, ptls_classifier(hidden=128, seed=4))
    batch, _ = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), result.model.eval()(batch), rtol=0, atol=0)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_a_per_layer_ratio_naming_a_recurrent_layer_prunes_only_it(global_pruning):
    model = seeded(SeqModel, "gru", 16)()
    work, history = copy.deepcopy(model).eval(), History()
    make_pruner(work, IDS, label="t", ratio={"rnn": 0.25}, global_pruning=global_pruning).step(history, 1)
    assert work.rnn.hidden_size == 12 and work.proj.out_features == 12


def test_magnitude_importance_removes_the_gru_units_that_never_move_even_when_the_head_reads_them_strongly():
    """Units 0-3 have no weights (their state stays 0, they add nothing) but the largest head columns: ranking by
    the head alone would keep them and remove the live units; with the units' own weights they go, losslessly."""
    model = seeded(SeqModel, "gru", 8)()
    with torch.no_grad():
        for name, p in model.rnn.named_parameters():
            p.view(3, 8, -1)[:, :4] = 0.0
            if name.startswith("weight_hh"):
                p[:, :4] = 0.0
        model.head.weight[:, :4] = 3.0 * model.head.weight[:, 4:].abs().max()
    pruned, _ = prune(model, IDS, ratio={"rnn": 0.5})
    assert pruned.rnn.hidden_size == 4
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS), model(IDS))


class PackedModel(nn.Module):
    """A bidirectional LSTM fed a PackedSequence (variable lengths), unpacked before the head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.rnn = nn.LSTM(8, 16, batch_first=True, bidirectional=True)
        self.head = nn.Linear(32, 3)

    def forward(self, ids, lens):
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(ids), lens, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        return self.head(nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0].mean(1))


def test_a_recurrent_layer_called_with_a_packed_sequence_is_kept_whole_with_a_warning_saying_why():
    """Packing and unpacking slice the sequence axis, which torch-pruning would take for channel slices."""
    model = seeded(PackedModel)()
    inputs = (torch.randint(0, 30, (4, 7)), torch.tensor([7, 3, 5, 2]))
    with pytest.warns(PruningWarning, match=r"cannot prune layer 'rnn' \(LSTM\) \(called with a PackedSequence\); "
                                            r"it is kept whole"):
        work = copy.deepcopy(model).eval()
        make_pruner(work, inputs, label="t", ratio=0.5).step(History(), 1)
    assert work.rnn.hidden_size == 16
    with torch.no_grad():
        torch.testing.assert_close(work(*inputs), model(*inputs))
