"""Importable targets for CLI tests (``model._target_=tests.helpers...``), and :func:`wait_until`."""
import os
import subprocess
import time
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import TinyDataModule, tiny_mlp


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float = 180, proc: Optional[subprocess.Popen] = None,
               poll_s: float = 0.1) -> Any:
    """Poll ``condition()`` until it returns something true, and return that. Fails (AssertionError naming ``what``)
    after ``timeout_s``, or as soon as ``proc``, the process the wait depends on, has ended (with its output)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.communicate() if proc.stdout or proc.stderr else ""
            raise AssertionError(f"the process ended (status {proc.returncode}) while waiting for {what}: {out}")
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(poll_s)


def build_tiny_mlp():
    return tiny_mlp()


def build_tiny_data(batch_size: int = 16, n_train: int = 96):
    return TinyDataModule(batch_size=batch_size, n_train=n_train)


class SlowTinyData(TinyDataModule):
    """Training batches that take ``$FEDCORE_TEST_BATCH_SLEEP`` seconds each (default 0.2): a run that lasts."""

    def train_dataloader(self):
        delay = float(os.environ.get("FEDCORE_TEST_BATCH_SLEEP", "0.2"))

        def slow(batch):
            time.sleep(delay)
            return torch.utils.data.default_collate(batch)

        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, collate_fn=slow,
                          generator=torch.Generator().manual_seed(0))


class BrokenForward(nn.Module):
    """A model whose forward raises (user code failing mid-run)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        raise ValueError("this model's forward is broken on purpose")


class WrongTargetsData(TinyDataModule):
    """Targets of shape [N, 5] for a 3-class model."""

    def __init__(self):
        super().__init__()
        for name in ("train", "val", "test"):
            x, _ = getattr(self, name).tensors
            setattr(self, name, TensorDataset(x, torch.rand(len(x), 5)))


class NoTrainLoaderDataModule:
    """A data module that forgot ``train_dataloader``."""

    def val_dataloader(self):
        return []


class EmptyDataModule(TinyDataModule):
    """A training loader over an empty dataset."""

    def __init__(self):
        super().__init__(n_train=0)

    def train_dataloader(self):
        from torch.utils.data import DataLoader

        return DataLoader(self.train, batch_size=16)


def mlflow_client(uri):
    """An MlflowClient on ``uri`` (mlflow imported only by the tests that track)."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


def runs_of(client, experiment: str, role: str) -> list:
    """The runs of ``experiment`` tagged with ``fedcore.role`` = ``role``, oldest first."""
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} is not in the store"
    return client.search_runs([exp.experiment_id], f"tags.`fedcore.role` = '{role}'", order_by=["start_time ASC"])
