"""An event-sequence encoder like pytorch-lifestream's, and a generated event-sequence dataset.

Model (``SeqGRUClassifier``): per event, an embedding for each categorical
field and a signed ``log1p`` of each numeric field are concatenated and
projected (ptls ``TrxEncoder``); a GRU reads the events and the hidden state
at the last real event is the sequence embedding (ptls ``RnnSeqEncoder``,
kept as ``model.seq_encoder``); a small MLP head classifies it.

Data (``EventSequenceDataModule``): clients of ``num_classes`` kinds emit
transactions: an event type drawn from a class-specific Markov chain (so the
order matters, not only the counts), a transaction type and an amount whose
scale depends on the event type and the class. Batches are dicts of padded
tensors (``event_type``, ``tr_type``, ``amount``, ``seq_len``) plus ``labels``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

CATEGORICAL = {"event_type": 24, "tr_type": 6}  # field -> number of values (index 0 is padding)
NUMERIC = ("amount",)


class TrxEncoder(nn.Module):
    """One vector per event: categorical embeddings + scaled numeric features, linearly projected."""

    def __init__(self, categorical: dict[str, int], numeric: Sequence[str], embedding_dim: int = 16,
                 out_dim: int = 32):
        super().__init__()
        self.numeric = list(numeric)
        self.embeddings = nn.ModuleDict({name: nn.Embedding(size + 1, embedding_dim)
                                         for name, size in categorical.items()})
        self.projection = nn.Linear(embedding_dim * len(categorical) + len(self.numeric), out_dim)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [emb(features[name]) for name, emb in self.embeddings.items()]
        parts += [torch.sign(v) * torch.log1p(v.abs()) for v in (features[n].unsqueeze(-1) for n in self.numeric)]
        return self.projection(torch.cat(parts, dim=-1))


class RnnSeqEncoder(nn.Module):
    """Events -> GRU -> the hidden state at each sequence's last real event: ``[B, hidden_size]``."""

    def __init__(self, categorical: dict[str, int], numeric: Sequence[str], embedding_dim: int = 16,
                 trx_dim: int = 32, hidden_size: int = 64):
        super().__init__()
        self.trx_encoder = TrxEncoder(categorical, numeric, embedding_dim, trx_dim)
        self.rnn = nn.GRU(trx_dim, hidden_size, batch_first=True)
        self.embedding_size = hidden_size

    def forward(self, features: dict[str, torch.Tensor], seq_len: Optional[torch.Tensor] = None) -> torch.Tensor:
        out, _ = self.rnn(self.trx_encoder(features))
        if seq_len is None:
            return out[:, -1]
        last = (seq_len.long() - 1).clamp(min=0)
        return out[torch.arange(out.shape[0], device=out.device), last]


class SeqGRUClassifier(nn.Module):
    """Event-sequence classifier: ``model(event_type=..., tr_type=..., amount=..., seq_len=...)`` -> logits.

    ``model.seq_encoder(features, seq_len)`` gives the sequence embedding alone.
    """

    def __init__(self, num_classes: int = 4, categorical: Optional[dict[str, int]] = None,
                 numeric: Sequence[str] = NUMERIC, embedding_dim: int = 16, trx_dim: int = 32,
                 hidden_size: int = 64, head_hidden: int = 64):
        super().__init__()
        categorical = dict(categorical or CATEGORICAL)
        self.fields = list(categorical) + list(numeric)
        self.seq_encoder = RnnSeqEncoder(categorical, numeric, embedding_dim, trx_dim, hidden_size)
        self.head = nn.Sequential(nn.Linear(hidden_size, head_hidden), nn.ReLU(), nn.Linear(head_hidden, num_classes))

    def forward(self, seq_len: Optional[torch.Tensor] = None, **features: torch.Tensor) -> torch.Tensor:
        missing = [f for f in self.fields if f not in features]
        if missing:
            raise ValueError(f"SeqGRUClassifier needs the fields {self.fields}; missing {missing}")
        return self.head(self.seq_encoder(features, seq_len))


def generate_event_sequences(n: int, num_classes: int = 4, categorical: Optional[dict[str, int]] = None,
                             min_len: int = 8, max_len: int = 32, class_strength: float = 0.5,
                             seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` padded event sequences and their class labels, reproducible from ``seed``.

    ``class_strength`` in [0, 1] mixes each class's own transition matrix into a
    shared one: 0 makes the classes indistinguishable, 1 makes them easy.
    """
    categorical = dict(categorical or CATEGORICAL)
    n_events, n_types = categorical["event_type"], categorical["tr_type"]
    rng = np.random.default_rng(seed)
    shared = rng.dirichlet(np.full(n_events, 0.5), size=n_events)
    own = rng.dirichlet(np.full(n_events, 0.3), size=(num_classes, n_events))
    transitions = (1 - class_strength) * shared[None] + class_strength * own  # [C, E, E]
    cum = transitions.cumsum(-1)
    type_probs = rng.dirichlet(np.full(n_types, 2.0), size=num_classes)
    log_scale = rng.normal(3.0, 1.0, size=n_events)[None] + rng.normal(0.0, 0.3, size=(num_classes, 1))

    labels = rng.integers(0, num_classes, size=n)
    lengths = rng.integers(min_len, max_len + 1, size=n)
    events = np.zeros((n, max_len), dtype=np.int64)
    state = rng.integers(0, n_events, size=n)
    for t in range(max_len):
        u = rng.random(n)[:, None]
        state = np.minimum((u > cum[labels, state]).sum(-1), n_events - 1)
        events[:, t] = state
    tr_cum = type_probs.cumsum(-1)[labels]
    tr_type = np.minimum((rng.random((n, max_len, 1)) > tr_cum[:, None, :]).sum(-1), n_types - 1)
    amount = np.exp(log_scale[labels[:, None], events] + rng.normal(0.0, 0.5, size=(n, max_len)))
    amount *= np.where(tr_type == 0, -1.0, 1.0)  # type 0 is a refund
    mask = np.arange(max_len)[None] < lengths[:, None]
    return {"event_type": np.where(mask, events + 1, 0), "tr_type": np.where(mask, tr_type + 1, 0),
            "amount": np.where(mask, amount, 0.0).astype(np.float32), "seq_len": lengths.astype(np.int64),
            "labels": labels.astype(np.int64)}


class EventSequenceDataset(Dataset):
    """Dict items of padded tensors from :func:`generate_event_sequences` arrays."""

    def __init__(self, arrays: dict[str, np.ndarray], index: Optional[np.ndarray] = None):
        index = np.arange(len(arrays["labels"])) if index is None else index
        self.tensors = {k: torch.as_tensor(v[index]) for k, v in arrays.items()}

    def __len__(self) -> int:
        return int(self.tensors["labels"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class EventSequenceDataModule:
    """Generated event sequences with k-fold test splits (``fold_id`` of ``n_folds`` is the test set).

    The rest is split into train and ``val_fraction`` validation. Same ``seed``,
    same data; each fold tests on different clients.
    """

    def __init__(self, num_samples: int = 3000, num_classes: int = 4, min_len: int = 8, max_len: int = 32,
                 class_strength: float = 0.5, n_folds: int = 5, fold_id: int = 0, val_fraction: float = 0.1,
                 batch_size: int = 64, eval_batch_size: Optional[int] = 256, seed: int = 42, num_workers: int = 0):
        if not 0 <= fold_id < n_folds:
            raise ValueError(f"fold_id={fold_id} is outside 0..{n_folds - 1} (n_folds={n_folds})")
        arrays = generate_event_sequences(num_samples, num_classes, min_len=min_len, max_len=max_len,
                                          class_strength=class_strength, seed=seed)
        order = np.random.default_rng(seed + 1).permutation(num_samples)
        folds = np.array_split(order, n_folds)
        rest = np.concatenate([f for i, f in enumerate(folds) if i != fold_id])
        n_val = int(round(len(rest) * val_fraction))
        self.train = EventSequenceDataset(arrays, rest[n_val:])
        self.val = EventSequenceDataset(arrays, rest[:n_val])
        self.test = EventSequenceDataset(arrays, folds[fold_id])
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=self.eval_batch_size, num_workers=self.num_workers)
