"""Batches and data modules: ptls PaddedBatch batches and PtlsDataModule loaders (real pytorch-lifestream)."""
from __future__ import annotations

import numpy as np
import torch
from ptls.data_load.padded_batch import PaddedBatch

from fedcore_adapter.data import batch_size, make_loader, provides, seeded, split_batch, to_device
from tests.ptls_helpers import coles_data, target_data


def padded(n: int = 3, length: int = 5) -> PaddedBatch:
    return PaddedBatch({"mcc": torch.randint(1, 9, (n, length)), "amount": torch.rand(n, length)},
                       torch.full((n,), length))


def test_a_padded_batch_alone_is_unlabeled_inputs_counted_by_its_length():
    x = padded(3)
    inputs, target = split_batch(x)
    assert inputs is x and target is None
    assert batch_size(inputs) == 3


def test_a_padded_batch_target_tuple_splits_into_the_batch_and_its_target():
    x, y = padded(4), torch.arange(4)
    inputs, target = split_batch((x, y))
    assert inputs is x and torch.equal(target, y)
    assert batch_size(inputs) == 4
    assert batch_size((x, torch.zeros(7))) == 4  # several inputs: the first one counts


def test_a_padded_batch_is_moved_with_its_own_to():
    moved = to_device((padded(2), torch.arange(2)), torch.device("meta"))
    assert isinstance(moved, tuple) and isinstance(moved[0], PaddedBatch)
    assert moved[0].payload["mcc"].device.type == "meta" and moved[1].device.type == "meta"


def test_ptls_loaders_set_as_instance_attributes_are_provided():
    dm = target_data()
    assert all(provides(dm, f"{s}_dataloader") for s in ("train", "val", "test"))
    x, y = next(iter(make_loader(dm, "train_dataloader")))
    assert isinstance(x, PaddedBatch) and len(x) == len(y) == 8


def test_a_missing_ptls_test_loader_is_absent_and_lightnings_placeholder_is_never_called():
    dm = coles_data()  # a PtlsDataModule without test_data: test_dataloader is Lightning's placeholder (raises)
    assert not provides(dm, "test_dataloader")
    assert make_loader(dm, "test_dataloader") is None


def test_a_random_split_strategy_yields_the_same_batches_when_seeded_and_leaves_the_generators_as_they_were():
    loader = coles_data().val_dataloader()
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    with seeded(7):
        first = next(iter(loader))
    with seeded(7):
        again = next(iter(loader))
    assert np.random.random() == before  # seeded() restores the state it found
    assert torch.equal(first[0].seq_lens, again[0].seq_lens)
    assert torch.equal(first[0].payload["mcc"], again[0].payload["mcc"])
    other = next(iter(loader))
    assert not torch.equal(first[0].seq_lens, other[0].seq_lens)  # unseeded: random slices differ

