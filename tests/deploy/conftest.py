"""Models and data for the deploy tests: the zoo's MNIST-1D CNN and a tiny BERT (built from a config, no download)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from fedcore_adapter.pipeline import run_setup
from fedcore_adapter.zoo.datamodules import MNIST1DDataModule
from fedcore_adapter.zoo.models import MNIST1DCNN

# the reloaded int8 artifact answers within this relative output error ||y_rt - y|| / ||y|| of the torch model
INT8_TOLERANCE = 0.1
FP32_TOLERANCE = 1e-4


def cnn_data() -> MNIST1DDataModule:
    return MNIST1DDataModule(batch_size=64, eval_batch_size=64)


def trained_cnn(dm: MNIST1DDataModule) -> torch.nn.Module:
    """The zoo CNN after a short training run (int8 agreement is meaningful on trained weights)."""
    torch.manual_seed(0)
    model = MNIST1DCNN()
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for i, (x, y) in enumerate(dm.train_dataloader()):
        if i == 40:
            break
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()


class _Tokens(Dataset):
    def __init__(self, n: int, length: int, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
        self.mask = (torch.arange(length)[None] < lengths[:, None]).long()
        self.ids = self.ids * self.mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "token_type_ids": torch.zeros_like(self.ids[i])}


class TokenData:
    """Unlabeled Hugging Face style batches of token ids (padded to 16)."""

    def __init__(self, vocab: int = 100):
        self.train, self.val, self.test = (_Tokens(n, 16, vocab, s) for n, s in ((64, 0), (16, 1), (16, 2)))

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=8)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=8)


def tiny_bert(pooler: bool = False) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    return BertModel(config, add_pooling_layer=pooler).eval()


def deploy_run(tmp_path, model, dm, **node):
    setup = {"name": "deploy", "common": {"latency_warmup": 1, "latency_repeats": 3, "limit_test_batches": 2},
             "nodes": [{"kind": "deploy", **node}]}
    return run_setup(setup, model, dm, output_dir=tmp_path)


@pytest.fixture(scope="module")
def cnn():
    dm = cnn_data()
    return trained_cnn(dm), dm
