"""Shared fixtures: tiny models and data modules that make engine tests take seconds, and a real
``mlflow server`` on 127.0.0.1 for tracking tests (started once per session, on first use)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyDataModule:
    """A linearly separable 3-class problem: 96 train, 32 val, 32 test samples of 8 features."""

    def __init__(self, batch_size: int = 16, seed: int = 0, n_train: int = 96):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(8, 3, generator=g)

        def make(n):
            x = torch.randn(n, 8, generator=g)
            return TensorDataset(x, (x @ w).argmax(1))

        self.train, self.val, self.test = make(n_train), make(32), make(32)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=self.batch_size)


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


class TinyEncoder(nn.Module):
    """A Hugging Face style encoder: ``model(input_ids=..., attention_mask=...)`` -> ``.last_hidden_state``."""

    def __init__(self, vocab: int = 50, hidden: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        h = self.proj(self.emb(input_ids))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return SimpleNamespace(last_hidden_state=h)


class TokenDataModule:
    """Unlabeled dict batches (``input_ids``, ``attention_mask``), as a text encoder receives them."""

    def __init__(self, n: int = 48, length: int = 6):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 50, (n, length), generator=g)
        self.items = [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long)} for i in range(n)]

    def _loader(self):
        return DataLoader(self.items, batch_size=8)

    train_dataloader = val_dataloader = test_dataloader = _loader


def tiny_setup(*nodes: dict, name: str = "T", **common) -> dict:
    common = {"latency_repeats": 2, "latency_warmup": 1, **common}
    return {"name": name, "common": common, "nodes": list(nodes) or [{"kind": "training", "epochs": 2}]}


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """A real ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1: ``(address, start_worker,
    workers)``."""
    from tests.servers import dask_scheduler

    yield from dask_scheduler(tmp_path_factory.mktemp("dask"))


@pytest.fixture
def one_thread():
    """Tiny models run fastest, and time most stably, on one thread (CI shares 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dm() -> TinyDataModule:
    return TinyDataModule()


@pytest.fixture
def model() -> nn.Module:
    return tiny_mlp()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, artifacts in a temporary folder); yields its URI."""
    from tests.servers import mlflow_server as serve

    with serve(tmp_path_factory.mktemp("mlflow_server")) as uri:
        yield uri


def pytest_collection_modifyitems(config, items):
    """Hydra's own launcher suites (tests/hydra_plugins) run first: they are written for a process in which no
    Hydra app has run yet (a run before them leaves Hydra's job working-directory rule changed for their jobs)."""
    items.sort(key=lambda item: 0 if "hydra_plugins" in item.nodeid.split("::")[0] else 1)
