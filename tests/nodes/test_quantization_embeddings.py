"""``ptq_dynamic`` with ``allow_emb``: int8 embedding tables, ``nn.Embedding`` subclasses (ptls's ``NoisyEmbedding``)
included when their eval forward is a plain lookup; every embedding left float is named with why."""
import copy
import logging
import re
from functools import partial

import pytest
import torch
from torch import nn

from fedcore_adapter import load_model
from fedcore_adapter.checkpoint import save_checkpoint
from fedcore_adapter.context import NodeContext
from fedcore_adapter.errors import NodeError
from fedcore_adapter.metrics import state_dict_bytes
from fedcore_adapter.nodes.quantization import PTQDynamicConfig
from fedcore_adapter.nodes.quantization.dynamic import apply_ptq_dynamic
from fedcore_adapter.nodes.quantization.embeddings import Int8Embedding, Int8EmbeddingBag
from fedcore_adapter.schema import CommonConfig
from fedcore_adapter.structure import transform_record
from tests.nodes.test_quantization import run
from tests.nodes.test_quantization_recurrent import SeqDataModule, relative_error

ptls = pytest.importorskip("ptls")
torchmetrics = pytest.importorskip("torchmetrics")
from ptls.data_load.padded_batch import PaddedBatch  # noqa: E402
from ptls.frames.supervised import SequenceToTarget  # noqa: E402
from ptls.nn import RnnSeqEncoder, TrxEncoder  # noqa: E402
from ptls.nn.trx_encoder.noisy_embedding import NoisyEmbedding  # noqa: E402

MCC, TR_TYPE = (2000, 32), (8, 4)  # (rows, dim): the mcc table is most of the float bytes


class ScaledEmbedding(nn.Embedding):
    """Rows times sqrt(dim) at every lookup, as transformer code does: not a plain lookup."""

    def forward(self, x):
        return super().forward(x) * self.embedding_dim ** 0.5


class OffsetEmbedding(nn.Embedding):
    """A learned offset added to every row: a parameter an int8 table would drop."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.offset = nn.Parameter(torch.full((self.embedding_dim,), 0.5))

    def forward(self, x):
        return super().forward(x) + self.offset


class BatchOnlyEmbedding(nn.Embedding):
    """Refuses a single sequence with an error that has no message (the probe's one sequence meets it)."""

    def forward(self, x):
        if x.shape[0] < 2:
            raise RuntimeError()
        return super().forward(x)


def classifier(seed: int = 0) -> SequenceToTarget:
    """A real ptls classifier: ``TrxEncoder`` (two ``NoisyEmbedding``s with training noise and dropout) -> GRU."""
    torch.manual_seed(seed)
    trx = TrxEncoder(embeddings={"mcc": {"in": MCC[0], "out": MCC[1]},
                                 "tr_type": {"in": TR_TYPE[0], "out": TR_TYPE[1]}},
                     numeric_values={"amount": "identity"}, embeddings_noise=0.003, emb_dropout=0.1)
    return SequenceToTarget(RnnSeqEncoder(trx_encoder=trx, hidden_size=32, type="gru"), head=nn.Linear(32, 3),
                            loss=nn.CrossEntropyLoss(),
                            metric_list=torchmetrics.Accuracy(task="multiclass", num_classes=3),
                            optimizer_partial=partial(torch.optim.Adam, lr=1e-3),
                            lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=1)).eval()


def trx_batch(n: int = 6, length: int = 15, seed: int = 1) -> PaddedBatch:
    g = torch.Generator().manual_seed(seed)
    return PaddedBatch({"mcc": torch.randint(1, MCC[0], (n, length), generator=g),
                        "tr_type": torch.randint(1, TR_TYPE[0], (n, length), generator=g),
                        "amount": torch.randn(n, length, generator=g)}, torch.randint(3, length + 1, (n,), generator=g))


def quantize(model: nn.Module, tmp_path, **options) -> tuple[nn.Module, NodeContext, list]:
    records = []
    ctx = NodeContext(train_loader=[trx_batch()], val_loader=[trx_batch()], test_loader=None, loss_fn=None,
                      device=torch.device("cpu"), teacher=model, output_dir=tmp_path / "work", common=CommonConfig(),
                      node_label="0:ptq_dynamic",
                      structure_recorder=lambda name, data: records.append(transform_record(name, data)))
    return apply_ptq_dynamic(copy.deepcopy(model), PTQDynamicConfig(**options), ctx), ctx, records


def test_ptls_noisy_embeddings_become_int8_tables_that_trx_encoder_still_reads_and_reload_exactly(tmp_path):
    model = classifier()
    assert all(type(e) is NoisyEmbedding for e in model.seq_encoder.trx_encoder.embeddings.values())
    floats, _, _ = quantize(model, tmp_path / "float", allow_emb=False)
    quantized, ctx, records = quantize(model, tmp_path / "int8", allow_emb=True)
    embeddings = quantized.seq_encoder.trx_encoder.embeddings
    assert all(type(e) is Int8Embedding and e.weight().dtype == torch.quint8 for e in embeddings.values())
    # what TrxEncoder reads: num_embeddings at forward time (clipping indices), embedding_dim for its output size
    assert ([(e.num_embeddings, e.embedding_dim, e.padding_idx) for e in embeddings.values()]
            == [(*MCC, 0), (*TR_TYPE, 0)])
    assert quantized.seq_encoder.trx_encoder.output_size == model.seq_encoder.trx_encoder.output_size
    assert ctx.notes == []
    rows, weights = MCC[0] + TR_TYPE[0], MCC[0] * MCC[1] + TR_TYPE[0] * TR_TYPE[1]
    saved = state_dict_bytes(floats) - state_dict_bytes(quantized)
    # float32 -> int8 per weight (3 bytes each), less a float32 scale and zero point per row and < 2 kB of entries
    assert 3 * weights - 8 * rows - 2048 <= saved <= 3 * weights
    x = trx_batch(seed=4)
    x.payload["mcc"][0, :3] = MCC[0] + 50  # out of the table: TrxEncoder clips with num_embeddings
    with torch.no_grad():
        assert relative_error(quantized(x), model(x)) < 0.05
    save_checkpoint(quantized, tmp_path / "ckpt", records)
    loaded = load_model(tmp_path / "ckpt", classifier(seed=7))
    assert type(loaded.seq_encoder.trx_encoder.embeddings["mcc"]) is Int8Embedding
    assert loaded.seq_encoder.trx_encoder.embeddings["mcc"].padding_idx == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), quantized(x), rtol=0, atol=0)


@pytest.mark.parametrize("make, why", [
    (ScaledEmbedding, r"ScaledEmbedding: its eval forward is not a plain Embedding lookup"),
    (OffsetEmbedding, r"OffsetEmbedding holds offset besides weight, which an int8 table would drop"),
    (BatchOnlyEmbedding, r"BatchOnlyEmbedding: its eval forward fails on an index tensor \(RuntimeError\)"),
], ids=["forward-differs", "extra-parameter", "forward-fails-without-message"])
def test_an_embedding_subclass_that_is_not_a_plain_lookup_stays_float_and_the_row_and_one_warning_say_why(
        make, why, tmp_path, caplog):
    model = classifier()
    model.seq_encoder.trx_encoder.embeddings["tr_type"] = make(*TR_TYPE, padding_idx=0)
    with caplog.at_level(logging.WARNING, logger="fedcore_adapter"):
        quantized, ctx, _ = quantize(model, tmp_path, allow_emb=True)
    embeddings = quantized.seq_encoder.trx_encoder.embeddings
    assert type(embeddings["mcc"]) is Int8Embedding and type(embeddings["tr_type"]) is make
    expected = rf"^layers kept in float: seq_encoder\.trx_encoder\.embeddings\.tr_type \({why}"
    assert len(ctx.notes) == 1 and re.match(expected, ctx.notes[0])
    warnings = [r.getMessage() for r in caplog.records if "kept in float" in r.getMessage()]
    assert warnings == [f"node 0:ptq_dynamic: {ctx.notes[0]}"]
    x = trx_batch(seed=4)
    with torch.no_grad():
        assert relative_error(quantized(x), model(x)) < 0.05


class BagClassifier(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(30, 16, mode=mode)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(self.bag(ids))


IDS = torch.randint(0, 30, (5, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_an_embedding_bag_that_does_not_sum_stays_float_and_the_metrics_row_says_why(mode, tmp_path):
    """torch's int8 bag kernel sums whatever the mode: quantized, a mean or max bag would return sums."""
    result = run({"kind": "ptq_dynamic", "allow_emb": True}, BagClassifier(mode).eval(), SeqDataModule(), tmp_path)
    assert type(result.model.bag) is nn.EmbeddingBag
    assert result.metrics[1]["note"] == (f"layers kept in float: bag (EmbeddingBag mode={mode!r}, padding_idx=None: "
                                         f"torch's int8 bag kernel only sums (mode='sum', no padding_idx))")


def test_a_summing_embedding_bag_becomes_an_int8_table_close_to_float_and_reloads_exactly(tmp_path):
    model = BagClassifier("sum").eval()
    result = run({"kind": "ptq_dynamic", "allow_emb": True}, copy.deepcopy(model), SeqDataModule(), tmp_path)
    assert type(result.model.bag) is Int8EmbeddingBag and result.model.bag.mode == "sum"
    assert not result.metrics[1].get("note")
    with torch.no_grad():
        assert relative_error(result.model(IDS), model(IDS)) < 0.02
        torch.testing.assert_close(load_model(result.output_dir, BagClassifier("sum"))(IDS), result.model(IDS),
                                   rtol=0, atol=0)


def test_when_every_quantizable_layer_must_stay_float_the_node_fails_naming_them_and_why(tmp_path):
    model = nn.Sequential(ScaledEmbedding(30, 4))
    with pytest.raises(NodeError, match=r"^node 0:ptq_dynamic: no layer can run in int8: layers kept in float: "
                                        r"0 \(ScaledEmbedding: its eval forward is not a plain Embedding lookup"):
        run({"kind": "ptq_dynamic", "allow_emb": True}, model, SeqDataModule(), tmp_path)
