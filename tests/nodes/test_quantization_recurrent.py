"""``ptq_dynamic`` on GRU/LSTM: torch's int8 recurrent kernels, tensors-only checkpoints, measured from shapes."""
import copy
import io
import logging
from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcore_adapter import load_model
from fedcore_adapter.checkpoint import save_checkpoint
from fedcore_adapter.context import NodeContext
from fedcore_adapter.errors import NodeError
from fedcore_adapter.metrics import count_macs, count_params, state_dict_bytes, weight_dtype
from fedcore_adapter.nodes.quantization import PTQDynamicConfig
from fedcore_adapter.nodes.quantization.dynamic import apply_ptq_dynamic
from fedcore_adapter.nodes.quantization.modules import DynamicLinear
from fedcore_adapter.nodes.quantization.recurrent import DynamicInt8GRU, DynamicInt8LSTM
from fedcore_adapter.schema import CommonConfig
from fedcore_adapter.structure import transform_record
from tests.nodes.test_quantization import run

RNNS = {"gru": nn.GRU, "lstm": nn.LSTM}
INT8 = {"gru": DynamicInt8GRU, "lstm": DynamicInt8LSTM}


class SeqClassifier(nn.Module):
    """A small embedding, a wide recurrent layer (most of the weights), a classifier on the last step."""

    def __init__(self, kind: str = "gru", hidden: int = 256, **options):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.rnn = RNNS[kind](16, hidden, batch_first=True, **options)
        self.head = nn.Linear(hidden * (2 if options.get("bidirectional") else 1), 4)

    def forward(self, ids):
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1])


def seeded(make, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return make(*args, **kwargs).eval()


class SeqDataModule:
    def __init__(self, n: int = 32, length: int = 12):
        g = torch.Generator().manual_seed(0)
        ids, labels = torch.randint(0, 30, (n, length), generator=g), torch.randint(0, 4, (n,), generator=g)
        self.data = TensorDataset(ids, labels)

    def _loader(self):
        return DataLoader(self.data, batch_size=8)

    train_dataloader = val_dataloader = test_dataloader = _loader


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


IDS = torch.randint(0, 30, (5, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind, options", [("gru", {}), ("lstm", {}), ("gru", {"num_layers": 2, "bidirectional": True}),
                                           ("lstm", {"num_layers": 2, "bidirectional": True})])
def test_gru_and_lstm_run_int8_kernels_the_checkpoint_is_several_times_smaller_and_reloads_exactly(kind, options,
                                                                                                   tmp_path):
    model = seeded(SeqClassifier, kind, **options)
    result = run({"kind": "ptq_dynamic"}, copy.deepcopy(model), SeqDataModule(), tmp_path, measure=True)
    quantized = result.model
    assert type(quantized.rnn) is INT8[kind]
    assert all(w.dtype == torch.qint8 for w in quantized.rnn.get_weight().values())
    before, after = result.metrics
    assert before["size_mb"] >= 3 * after["size_mb"]
    assert after["params"] == before["params"]  # packed int8 weights are counted
    assert after["macs"] == pytest.approx(before["macs"], rel=0.05)  # from the int8 layers' shapes
    assert after["dtype"].startswith("int8")
    with torch.no_grad():
        assert relative_error(quantized(IDS), model(IDS)) < 0.05
    loaded = load_model(result.output_dir, seeded(SeqClassifier, kind, seed=9, **options))
    assert type(loaded.rnn) is INT8[kind]
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), quantized(IDS), rtol=0, atol=0)


def int8_gru(qconfig=torch.ao.quantization.per_channel_dynamic_qconfig, **options) -> DynamicInt8GRU:
    model = seeded(SeqClassifier, "gru", **options)
    model.rnn.qconfig = qconfig
    return DynamicInt8GRU.from_float(model.rnn)


def test_the_checkpoint_holds_int8_weights_under_the_float_layers_names_with_float32_scales_beside_them():
    rnn = int8_gru(num_layers=2)
    state = rnn.state_dict()
    params = [n for n, _ in nn.GRU(16, 256, num_layers=2).named_parameters()]
    weights = [n for n in params if n.startswith("weight")]
    assert sorted(state) == sorted(params + [f"{n}_scale" for n in weights])  # symmetric: no zero points saved
    assert all(state[n].dtype == torch.int8 and state[f"{n}_scale"].dtype == torch.float32 for n in weights)
    assert all(state[n].dtype == torch.float32 for n in params if n.startswith("bias"))
    assert state["weight_hh_l1_scale"].shape == (3 * 256,)  # one scale per output channel
    buffer = io.BytesIO()
    torch.save(state, buffer)
    int8_bytes = sum(state[n].numel() for n in weights)
    assert buffer.tell() < 1.1 * int8_bytes  # scales, biases and the file's own overhead under 10 %


@pytest.mark.parametrize("qconfig", [torch.ao.quantization.per_channel_dynamic_qconfig,
                                     torch.ao.quantization.default_dynamic_qconfig], ids=["per-channel", "per-tensor"])
def test_an_int8_recurrent_layer_reloads_the_same_int8_weights_and_scales(qconfig):
    rnn = int8_gru(qconfig, num_layers=2, bidirectional=True)
    fresh = int8_gru(qconfig, seed=5, num_layers=2, bidirectional=True)
    fresh.load_state_dict(rnn.state_dict())
    for name, weight in rnn.get_weight().items():
        reloaded = fresh.get_weight()[name]
        assert torch.equal(reloaded.int_repr(), weight.int_repr()) and reloaded.qscheme() == weight.qscheme()
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            assert torch.equal(reloaded.q_per_channel_scales(), weight.q_per_channel_scales())
        else:
            assert reloaded.q_scale() == weight.q_scale()
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(fresh(x)[0], rnn(x)[0], rtol=0, atol=0)


def test_a_state_dict_holding_quantized_weight_tensors_still_loads():
    rnn = int8_gru()
    earlier = {**rnn._weight_bias()["weight"], **rnn._weight_bias()["bias"]}  # the format before float32 scales
    assert earlier["weight_ih_l0"].dtype == torch.qint8
    fresh = int8_gru(seed=5)
    fresh.load_state_dict(earlier)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(fresh(x)[0], rnn(x)[0], rtol=0, atol=0)


def test_int8_recurrent_layers_are_measured_from_their_shapes():
    model = seeded(SeqClassifier, "lstm", hidden=64, bidirectional=True)
    quantized = seeded(SeqClassifier, "lstm", hidden=64, bidirectional=True)
    quantized.rnn.qconfig = torch.ao.quantization.default_dynamic_qconfig
    quantized.rnn = DynamicInt8LSTM.from_float(quantized.rnn)
    assert count_params(quantized) == count_params(model)
    assert weight_dtype(quantized).startswith("int8")
    steps = IDS.shape[1]
    gates = 4 * 64 * (16 + 64) * 2  # per step: 4 gates x hidden x (input + hidden), both directions
    head = 128 * 4
    assert count_macs(quantized, IDS) == steps * gates + head
    assert state_dict_bytes(quantized) < state_dict_bytes(model) / 3


def test_allow_rnn_false_keeps_the_recurrent_layer_in_float_as_asked(tmp_path):
    result = run({"kind": "ptq_dynamic", "allow_rnn": False}, seeded(SeqClassifier), SeqDataModule(), tmp_path)
    assert type(result.model.rnn) is nn.GRU and "note" not in result.metrics[1]


@pytest.mark.parametrize("kind, options, why", [
    ("lstm", {"proj_size": 8}, "LSTM with proj_size > 0: torch's int8 recurrent kernels have no projection"),
    ("gru", {"bias": False}, "GRU with bias=False: torch's int8 recurrent kernels need biases"),
], ids=["lstm-proj_size", "gru-no-bias"])
def test_a_recurrent_layer_the_int8_kernels_cannot_take_stays_float_and_the_row_and_one_warning_say_why(
        kind, options, why, tmp_path, caplog):
    model = seeded(SeqClassifier, kind, hidden=32, **options)
    model.head = nn.Linear(options.get("proj_size", 32), 4)
    with caplog.at_level(logging.WARNING, logger="fedcore_adapter"):
        result = run({"kind": "ptq_dynamic"}, model, SeqDataModule(), tmp_path)  # allow_rnn: true by default
    assert type(result.model.rnn) is RNNS[kind] and type(result.model.head) is DynamicLinear
    note = result.metrics[1]["note"]
    assert note == f"layers kept in float: rnn ({why})"
    warnings = [r.getMessage() for r in caplog.records if "kept in float" in r.getMessage()]
    assert warnings == [f"node 0:ptq_dynamic: {note}"]
    with torch.no_grad():
        assert relative_error(result.model(IDS), model(IDS)) < 0.05


def test_export_with_int8_recurrent_layers_is_a_one_line_error_naming_them_and_the_ways_out(tmp_path):
    with pytest.raises(NodeError, match=r"node 0:ptq_dynamic: export=true cannot write int8 GRU/LSTM layers \(rnn\) "
                                        r"into a torch.export archive; set allow_rnn=false"):
        run({"kind": "ptq_dynamic", "export": True}, seeded(SeqClassifier, hidden=32), SeqDataModule(), tmp_path)


def test_skip_patterns_name_recurrent_layers(tmp_path):
    quantized = run({"kind": "ptq_dynamic", "skip": ["rnn"]}, seeded(SeqClassifier), SeqDataModule(), tmp_path).model
    assert type(quantized.rnn) is nn.GRU and type(quantized.head) is DynamicLinear


# -- real pytorch-lifestream modules ---------------------------------------------------------------------
ptls = pytest.importorskip("ptls")
torchmetrics = pytest.importorskip("torchmetrics")
from ptls.data_load.padded_batch import PaddedBatch  # noqa: E402
from ptls.frames.coles import CoLESModule  # noqa: E402
from ptls.frames.supervised import SequenceToTarget  # noqa: E402
from ptls.nn import Head, RnnSeqEncoder, TrxEncoder  # noqa: E402


def trx_batch(n=6, length=15, seed=1) -> PaddedBatch:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, length + 1, (n,), generator=g)
    return PaddedBatch({"mcc": torch.randint(1, 20, (n, length), generator=g),
                        "amount": torch.randn(n, length, generator=g)}, lens)


def encoder(kind="gru") -> RnnSeqEncoder:
    trx = TrxEncoder(embeddings={"mcc": {"in": 20, "out": 8}}, numeric_values={"amount": "identity"})
    return RnnSeqEncoder(trx_encoder=trx, hidden_size=256, type=kind)


def seq_to_target(kind="gru", seed=0):
    torch.manual_seed(seed)
    return SequenceToTarget(encoder(kind), head=nn.Linear(256, 3), loss=nn.CrossEntropyLoss(),
                            metric_list=torchmetrics.Accuracy(task="multiclass", num_classes=3),
                            optimizer_partial=partial(torch.optim.Adam, lr=1e-3),
                            lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=1)).eval()


def coles(seed=0):
    torch.manual_seed(seed)
    return CoLESModule(encoder("gru"), head=Head(use_norm_encoder=True),
                       optimizer_partial=partial(torch.optim.Adam, lr=1e-3),
                       lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=1)).eval()


@pytest.mark.parametrize("make", [partial(seq_to_target, "gru"), partial(seq_to_target, "lstm"), coles],
                         ids=["seq_to_target-gru", "seq_to_target-lstm", "coles-gru"])
def test_ptls_encoders_quantize_their_recurrent_layer_and_reload_onto_a_fresh_module(make, tmp_path):
    model = make()
    records = []
    ctx = NodeContext(train_loader=[trx_batch()], val_loader=[trx_batch()], test_loader=None, loss_fn=None,
                      device=torch.device("cpu"), teacher=model, output_dir=tmp_path / "work", common=CommonConfig(),
                      node_label="0:ptq_dynamic",
                      structure_recorder=lambda name, data: records.append(transform_record(name, data)))
    quantized = apply_ptq_dynamic(model, PTQDynamicConfig(), ctx)
    assert type(quantized.seq_encoder.seq_encoder.rnn).__name__.startswith("DynamicInt8")
    assert state_dict_bytes(quantized) * 3 <= state_dict_bytes(model)
    x = trx_batch(seed=4)
    with torch.no_grad():
        assert relative_error(quantized(x), model(x)) < 0.05
    save_checkpoint(quantized, tmp_path / "ckpt", records)
    loaded = load_model(tmp_path / "ckpt", make(seed=7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), quantized(x), rtol=0, atol=0)


def test_a_ptls_coles_module_through_a_setup_runs_its_gru_in_int8_and_reloads_exactly(tmp_path):
    from fedcore_adapter import run_setup
    from tests.ptls_helpers import coles as ptls_coles
    from tests.ptls_helpers import coles_data

    setup = {"name": "Q", "common": {"latency_repeats": 2, "latency_warmup": 1}, "nodes": [{"kind": "ptq_dynamic"}]}
    dm = coles_data()
    result = run_setup(setup, ptls_coles(hidden=256), dm, output_dir=tmp_path)
    before, after = result.metrics
    assert before["size_mb"] >= 3 * after["size_mb"] and after["params"] == before["params"]
    assert type(result.model.seq_encoder.seq_encoder.rnn) is DynamicInt8GRU
    loaded = load_model(result.output_dir, ptls_coles(hidden=256, seed=3))
    batch, _ = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), result.model.eval()(batch), rtol=0, atol=0)
