"""Tiny real pytorch-lifestream objects (CoLESModule, SequenceToTarget, PtlsDataModule) for fast tests."""
from __future__ import annotations

from fedcore_adapter.zoo import lifestream

SMALL = {"num_clients": 40, "min_len": 6, "max_len": 16, "batch_size": 8, "seed": 0}


def coles(hidden: int = 8, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return lifestream.coles_module(hidden_size=hidden, mcc_dim=4, tr_type_dim=2)


def seq_to_target(hidden: int = 8, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return lifestream.sequence_to_target(num_classes=4, hidden_size=hidden, mcc_dim=4, tr_type_dim=2)


def coles_data(**kw):
    return lifestream.coles_datamodule(**{**SMALL, "split_count": 3, "cnt_min": 3, "cnt_max": 6, **kw})


def target_data(**kw):
    return lifestream.target_datamodule(**{**SMALL, **kw})
