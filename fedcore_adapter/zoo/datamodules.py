"""Data modules following the LightningDataModule protocol (Lightning itself not required)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


class TensorDataModule:
    """Train / validation / test splits held as tensors, served by DataLoaders."""

    def __init__(self, train: TensorDataset, val: TensorDataset, test: TensorDataset, batch_size: int = 128,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, seed: int = 0):
        self.train, self.val, self.test = train, val, test
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=generator,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=self.eval_batch_size, num_workers=self.num_workers)


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(round(len(x) * val_fraction))
    return (x[order[n_val:]], y[order[n_val:]]), (x[order[:n_val]], y[order[:n_val]])


def _dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))


class MNIST1DDataModule(TensorDataModule):
    """MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package: 4000 train / 1000 test, length 40.

    ``val_fraction`` of the training set is held out for validation; inputs are ``[N, 1, 40]``.
    """

    def __init__(self, batch_size: int = 128, eval_batch_size: Optional[int] = 256, val_fraction: float = 0.1,
                 num_samples: int = 5000, seed: int = 42, num_workers: int = 0):
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = num_samples
        args.seed = seed
        data = make_dataset(args)
        (xt, yt), (xv, yv) = _split(data["x"], data["y"], val_fraction, seed)
        super().__init__(_dataset(xt[:, None, :], yt), _dataset(xv[:, None, :], yv),
                         _dataset(data["x_test"][:, None, :], data["y_test"]), batch_size, eval_batch_size,
                         num_workers, seed)


class DigitsDataModule(TensorDataModule):
    """scikit-learn's 8x8 handwritten digits (1797 images, shipped with the package), inputs ``[N, 1, 8, 8]``."""

    def __init__(self, batch_size: int = 64, eval_batch_size: Optional[int] = 256, test_fraction: float = 0.2,
                 val_fraction: float = 0.1, seed: int = 42, num_workers: int = 0):
        from sklearn.datasets import load_digits  # lazy: scikit-learn takes seconds; only this data module needs it

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[:, None]
        (x_rest, y_rest), (x_test, y_test) = _split(x, digits.target, test_fraction, seed)
        (xt, yt), (xv, yv) = _split(x_rest, y_rest, val_fraction, seed + 1)
        super().__init__(_dataset(xt, yt), _dataset(xv, yv), _dataset(x_test, y_test), batch_size, eval_batch_size,
                         num_workers, seed)
