"""Quantization nodes end in real int8 modules, reload from tensors + a plan, and refuse bad input cleanly.

Shared tiny models and data for the ``test_quantization_*`` files live here too (their fixtures:
tests/nodes/conftest.py).
"""
import copy
import functools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcore_adapter import load_model, run_setup
from fedcore_adapter.data import has_quantized_weights
from fedcore_adapter.errors import NodeError
from tests.conftest import TinyDataModule, tiny_mlp, tiny_setup


class TinyConvNet(nn.Module):
    """Conv1d+BN+ReLU twice, then an MLP: ``[N, 1, 16]`` -> 3 logits (torch.fx traceable, ~40k weights)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv1d(1, 32, 3, padding=1, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Conv1d(32, 64, 3, padding=1, stride=2, bias=False), nn.BatchNorm1d(64), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x):
        return self.classifier(self.features(x))


class BranchyNet(TinyConvNet):
    """Same layers, but data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        h = self.features(x)
        if h.sum() > 0:
            h = h * 1.0
        return self.classifier(h)


class ConvDataModule:
    """3 classes of noisy sign patterns, inputs ``[N, 1, 16]``: 96 train, 32 val, 32 test."""

    def __init__(self, n_val: int = 32):
        g = torch.Generator().manual_seed(0)
        patterns = torch.randn(3, 16, generator=g)

        def make(n):
            y = torch.randint(0, 3, (n,), generator=g)
            return TensorDataset((patterns[y] + 0.3 * torch.randn(n, 16, generator=g))[:, None], y)

        self.train, self.val, self.test = make(96), make(n_val), make(32)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=16)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=16)


def run(node: dict, model: nn.Module, dm, tmp_path, measure: bool = False):
    return run_setup(tiny_setup(node, measure=measure), model, dm, output_dir=tmp_path)


@functools.lru_cache(maxsize=1)
def trained_conv(epochs: int = 3) -> nn.Module:
    """A TinyConvNet trained a little (BatchNorm statistics and weights not at their init); shared, never mutated."""
    model = TinyConvNet()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        for x, y in ConvDataModule().train_dataloader():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


# -- every kind ends in int8 modules that reload exactly, measured honestly ---------------------------------------
@pytest.mark.parametrize("node", [
    {"kind": "ptq_dynamic", "allow_conv": True},
    {"kind": "ptq_static"},
    {"kind": "qat", "epochs": 1},
], ids=["dynamic", "static", "qat"])
def test_each_kind_ends_in_int8_kernels_that_reload_identically_and_measure_smaller(node, conv_model, conv_dm,
                                                                                  tmp_path):
    result = run(node, conv_model, conv_dm, tmp_path, measure=True)
    assert has_quantized_weights(result.model)
    assert all(type(m) not in (nn.Conv1d, nn.Linear) for m in result.model.modules()), "a float layer was left"
    x = conv_dm.test[:8][0]
    reloaded = load_model(result.output_dir, TinyConvNet(seed=5))
    assert torch.equal(reloaded(x), result.model(x))
    before, after = result.metrics
    assert after["macs"] == before["macs"]  # same arithmetic, now in int8
    assert after["params"] >= 0.99 * before["params"]  # packed weights are counted (BatchNorm folded away)
    assert after["size_mb"] < before["size_mb"] / 2.5  # bytes of the int8 checkpoint, scales included
    assert after["dtype"].startswith("int8") and after["device"] == "cpu"
    assert abs(after["accuracy"] - before["accuracy"]) <= 0.07  # 32 test samples: at most 2 flips


def test_quantizing_leaves_the_input_model_float(conv_model, conv_dm, tmp_path):
    original = copy.deepcopy(conv_model.state_dict())
    run({"kind": "ptq_static"}, conv_model, conv_dm, tmp_path)
    assert all(torch.equal(v, conv_model.state_dict()[k]) for k, v in original.items())


# -- bad input: one line naming the node and the reason, model untouched ------------------------------------------
class NoLayers(nn.Module):
    def forward(self, x):
        return torch.relu(x)


@pytest.mark.parametrize("kind", ["ptq_dynamic", "ptq_static", "qat"])
def test_a_model_without_quantizable_layers_is_refused(kind, dm, tmp_path):
    with pytest.raises(NodeError, match=r"node 0:\w+: the model has no quantizable layers \(Linear"):
        run({"kind": kind}, NoLayers(), dm, tmp_path)


class EmptyValidation(TinyDataModule):
    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)

    def train_dataloader(self):
        return self.val_dataloader()


def test_static_quantization_without_calibration_data_is_refused_and_model_untouched(tmp_path):
    from fedcore_adapter.context import NodeContext
    from fedcore_adapter.nodes.quantization import PTQStaticConfig
    from fedcore_adapter.nodes.quantization.static import apply_ptq_static
    from fedcore_adapter.schema import CommonConfig

    model, dm = tiny_mlp(), EmptyValidation()
    before = copy.deepcopy(model.state_dict())
    ctx = NodeContext(dm.train_dataloader(), dm.val_dataloader(), None, None, torch.device("cpu"), model,
                      tmp_path, CommonConfig(), node_label="0:ptq_static")
    with pytest.raises(NodeError, match=r"node 0:ptq_static: static quantization needs calibration data"):
        apply_ptq_static(model, PTQStaticConfig(), ctx)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(model[0]) is nn.Linear


def test_an_engine_missing_from_this_torch_build_lists_the_available_ones(dm, tmp_path, monkeypatch):
    from fedcore_adapter.nodes.quantization import calibration

    monkeypatch.setattr(calibration, "supported_engines", lambda: ["x86", "fbgemm"])
    with pytest.raises(NodeError,
                       match=r"backend 'qnnpack' is not available in this torch build; available: x86, fbgemm"):
        run({"kind": "ptq_dynamic", "backend": "qnnpack"}, tiny_mlp(), dm, tmp_path)
