"""Built-in data modules: shapes, disjoint splits, no download."""
import torch

from fedcore_adapter.zoo.datamodules import DigitsDataModule, MNIST1DDataModule
from fedcore_adapter.zoo.models import DigitsCNN, MNIST1DCNN


def test_mnist1d_is_4000_train_1000_test_with_a_held_out_validation_slice():
    dm = MNIST1DDataModule()
    assert (len(dm.train), len(dm.val), len(dm.test)) == (3600, 400, 1000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 40) and y.dtype == torch.long and int(y.max()) <= 9
    assert MNIST1DCNN()(x).shape == (128, 10)


def test_mnist1d_generation_is_deterministic_for_a_seed():
    a, b = MNIST1DDataModule(seed=3), MNIST1DDataModule(seed=3)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])


def test_digits_splits_cover_the_1797_images():
    dm = DigitsDataModule()
    assert len(dm.train) + len(dm.val) + len(dm.test) == 1797
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape[1:] == (1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert DigitsCNN()(x).shape[1] == 10
