"""Importable targets for CLI tests (``model._target_=tests.helpers...``)."""
from tests.conftest import TinyDataModule, tiny_mlp


def build_tiny_mlp():
    return tiny_mlp()


def build_tiny_data():
    return TinyDataModule()


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
