"""pytorch-lifestream (ptls) models and data modules on generated transactions.

Needs the ``ptls`` extra (``pip install 'fedcore-adapter[ptls]'``). Everything here
is made of real ptls objects, the way a ptls user builds them:

- :func:`generate_transactions`: clients of ``num_classes`` kinds, 50-300 events
  each by default, with an ``mcc`` code (a class-specific Markov chain, so the
  order matters), a transaction type ``tr_type``, an ``amount`` and an
  ``event_time``; ``target`` is the client's class (for downstream checks).
- :func:`gru_encoder`: ``RnnSeqEncoder(TrxEncoder(mcc, tr_type embeddings, log amount), GRU)``.
- :func:`coles_module` / :func:`sequence_to_target`: ``CoLESModule`` (contrastive
  pre-training) and ``SequenceToTarget`` (a classifier head and a torchmetrics accuracy).
- :func:`coles_datamodule` / :func:`target_datamodule`: ``PtlsDataModule`` over
  ``ColesDataset`` (``SampleSlices`` sub-sequences) or ``SeqToTargetDataset``
  (``(PaddedBatch, target)`` batches); clients are split into train/valid/test.
- :func:`downstream_accuracy`: logistic regression on embeddings (cross-validated); :func:`embed`,
  :func:`first_sequences`: embeddings of a loader, a smaller `PaddedBatch`.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional

import numpy as np
import torch

from .sequences import generate_event_sequences

FIELDS = {"mcc": 100, "tr_type": 6}  # categorical field -> number of values (index 0 is padding)


def generate_transactions(num_clients: int = 2000, num_classes: int = 4, n_mcc: int = FIELDS["mcc"],
                          min_len: int = 50, max_len: int = 300, class_strength: float = 0.3,
                          seed: int = 0) -> list[dict]:
    """``num_clients`` ptls feature dicts (``client_id``, ``target``, ``event_time``, ``mcc``, ``tr_type``,
    ``amount``)."""
    arrays = generate_event_sequences(num_clients, num_classes, {"event_type": n_mcc, "tr_type": FIELDS["tr_type"]},
                                      min_len=min_len, max_len=max_len, class_strength=class_strength, seed=seed)
    records = []
    for i, length in enumerate(arrays["seq_len"]):
        records.append({
            "client_id": i, "target": int(arrays["labels"][i]),
            "event_time": torch.arange(length, dtype=torch.float32),
            "mcc": torch.as_tensor(arrays["event_type"][i, :length]),
            "tr_type": torch.as_tensor(arrays["tr_type"][i, :length]),
            "amount": torch.as_tensor(arrays["amount"][i, :length]),
        })
    return records


def split_clients(records: list[dict], valid: float = 0.1, test: float = 0.2,
                  seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """``(train, valid, test)`` client lists, shuffled with ``seed``."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_test, n_valid = int(round(len(records) * test)), int(round(len(records) * valid))
    pick = lambda idx: [records[i] for i in idx]  # noqa: E731
    return pick(order[n_test + n_valid:]), pick(order[n_test:n_test + n_valid]), pick(order[:n_test])


def gru_encoder(hidden_size: int = 256, n_mcc: int = FIELDS["mcc"], mcc_dim: int = 16, tr_type_dim: int = 4,
                num_layers: int = 1, bidir: bool = False) -> Any:
    """A ptls ``RnnSeqEncoder``: ``TrxEncoder`` (mcc and tr_type embeddings, log amount) then a GRU."""
    from ptls.nn import RnnSeqEncoder, TrxEncoder  # lazy: the ptls extra; this module's generators need only torch

    trx = TrxEncoder(embeddings={"mcc": {"in": n_mcc + 1, "out": mcc_dim},
                                 "tr_type": {"in": FIELDS["tr_type"] + 1, "out": tr_type_dim}},
                     numeric_values={"amount": "log"})
    return RnnSeqEncoder(trx_encoder=trx, hidden_size=hidden_size, type="gru", num_layers=num_layers, bidir=bidir)


def _optimizer(lr: float):
    return partial(torch.optim.Adam, lr=lr), partial(torch.optim.lr_scheduler.StepLR, step_size=10, gamma=0.9)


def coles_module(hidden_size: int = 256, n_mcc: int = FIELDS["mcc"], lr: float = 1e-3, **encoder: Any) -> Any:
    """A ptls ``CoLESModule`` (its default head: L2-normalised embeddings; contrastive loss) on :func:`gru_encoder`."""
    from ptls.frames.coles import CoLESModule  # lazy: the ptls extra, as in gru_encoder

    optimizer, scheduler = _optimizer(lr)
    return CoLESModule(seq_encoder=gru_encoder(hidden_size, n_mcc, **encoder), optimizer_partial=optimizer,
                       lr_scheduler_partial=scheduler)


def sequence_to_target(num_classes: int = 4, hidden_size: int = 64, n_mcc: int = FIELDS["mcc"], lr: float = 1e-3,
                       **encoder: Any) -> Any:
    """A ptls ``SequenceToTarget`` classifier (log-softmax head, NLL loss, torchmetrics multiclass accuracy)."""
    # lazy: the ptls extra, as in gru_encoder (torchmetrics takes seconds to import)
    import torchmetrics
    from ptls.frames.supervised import SequenceToTarget

    optimizer, scheduler = _optimizer(lr)
    head = torch.nn.Sequential(torch.nn.Linear(hidden_size, num_classes), torch.nn.LogSoftmax(dim=-1))
    return SequenceToTarget(seq_encoder=gru_encoder(hidden_size, n_mcc, **encoder), head=head,
                            loss=torch.nn.NLLLoss(),
                            metric_list={"accuracy": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)},
                            optimizer_partial=optimizer, lr_scheduler_partial=scheduler)


def _records(num_clients: int, num_classes: int, min_len: int, max_len: int, seed: int, n_mcc: int):
    records = generate_transactions(num_clients, num_classes, n_mcc, min_len, max_len, seed=seed)
    return split_clients(records, seed=seed)


def coles_datamodule(num_clients: int = 2000, num_classes: int = 4, min_len: int = 50, max_len: int = 300,
                     split_count: int = 5, cnt_min: int = 25, cnt_max: int = 150, batch_size: int = 64,
                     n_mcc: int = FIELDS["mcc"], seed: int = 0) -> Any:
    """A ``PtlsDataModule`` of ``ColesDataset`` s (``split_count`` random slices per client); no test split."""
    # lazy: the ptls extra, as in gru_encoder
    from ptls.data_load.datasets import MemoryMapDataset
    from ptls.frames import PtlsDataModule
    from ptls.frames.coles import ColesDataset
    from ptls.frames.coles.split_strategy import SampleSlices

    train, valid, _ = _records(num_clients, num_classes, min_len, max_len, seed, n_mcc)
    make = lambda data: ColesDataset(MemoryMapDataset(data, n_jobs=1),  # noqa: E731
                                     splitter=SampleSlices(split_count=split_count, cnt_min=cnt_min, cnt_max=cnt_max))
    return PtlsDataModule(train_data=make(train), valid_data=make(valid), train_batch_size=batch_size,
                          valid_batch_size=batch_size)


def target_datamodule(num_clients: int = 2000, num_classes: int = 4, min_len: int = 50, max_len: int = 300,
                      batch_size: int = 64, n_mcc: int = FIELDS["mcc"], seed: int = 0, test_split: str = "test") -> Any:
    """A ``PtlsDataModule`` of ``SeqToTargetDataset`` s: ``(PaddedBatch, target)`` batches, train/valid/test.

    ``test_split='all'`` makes every client the test split (to embed them all for a downstream check).
    """
    # lazy: the ptls extra, as in gru_encoder
    from ptls.data_load.datasets import MemoryMapDataset
    from ptls.frames import PtlsDataModule
    from ptls.frames.supervised import SeqToTargetDataset

    train, valid, test = _records(num_clients, num_classes, min_len, max_len, seed, n_mcc)
    if test_split == "all":
        test = train + valid + test
    make = lambda data: SeqToTargetDataset(MemoryMapDataset(data, n_jobs=1), target_col_name="target",  # noqa: E731
                                           target_dtype=torch.long)
    return PtlsDataModule(train_data=make(train), valid_data=make(valid), test_data=make(test),
                          train_batch_size=batch_size, valid_batch_size=batch_size, test_batch_size=batch_size)


def downstream_accuracy(embeddings: np.ndarray, target: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Mean cross-validated accuracy of a logistic regression on standardised ``embeddings``."""
    # lazy: scikit-learn takes seconds to import; only the downstream check needs it
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(model, np.asarray(embeddings), np.asarray(target), cv=cv)))


def embed(seq_encoder: torch.nn.Module, loader: Any, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings, targets)`` of a ``(PaddedBatch, target)`` loader through ``seq_encoder``."""
    outs, targets = [], []
    seq_encoder.eval()
    with torch.inference_mode():
        for i, (x, y) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            outs.append(seq_encoder(x).float().reshape(len(y), -1))
            targets.append(y)
    return torch.cat(outs).numpy(), torch.cat(targets).numpy()


def first_sequences(batch: Any, n: int) -> Any:
    """A ``PaddedBatch`` of the first ``n`` sequences of ``batch``, padded to their own longest length."""
    from ptls.data_load.padded_batch import PaddedBatch  # lazy: the ptls extra, as in gru_encoder

    lengths = batch.seq_lens[:n]
    longest = int(lengths.max())
    payload = {k: (v[:n, :longest] if v.dim() >= 2 else v[:n]) for k, v in batch.payload.items()}
    return PaddedBatch(payload, lengths)
