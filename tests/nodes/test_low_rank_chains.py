"""Low-rank in chains: before and after structured pruning (COMPOSITE_2), and before int8 quantization."""
import pytest
import torch

from fedcore_adapter import load_model, run_setup
from fedcore_adapter.nodes.low_rank import FactorizedLayer
from tests.conftest import TinyDataModule, tiny_setup
from tests.nodes.test_low_rank import low_rank_mlp

LOW_RANK = {"kind": "low_rank", "thresholds": [0.999], "layer_types": ["linear"]}
PRUNING = {"kind": "pruning", "pruning_ratio": 0.5, "epochs": 0}


def _run(tmp_path, *nodes):
    return run_setup(tiny_setup(*nodes, measure=False), low_rank_mlp(), TinyDataModule(), output_dir=tmp_path)


def _reloads(result):
    loaded = load_model(result.output_dir / "final", low_rank_mlp(seed=9))
    x = torch.randn(6, 8)
    torch.testing.assert_close(loaded(x), result.model.eval()(x))


def test_pruning_a_decomposed_model_narrows_its_factor_layers_and_reloads(tmp_path):
    pytest.importorskip("fedcore_adapter.nodes.pruning")
    result = _run(tmp_path, LOW_RANK, PRUNING)
    layer = result.model[2]
    assert isinstance(layer, FactorizedLayer)
    assert layer.second.out_features < 64  # pruning removed neurons behind the factorised layer
    _reloads(result)  # low-rank replay (shapes at decomposition time), then pruning's replay


def test_low_rank_after_pruning_and_again_after_it(tmp_path):
    pytest.importorskip("fedcore_adapter.nodes.pruning")
    result = _run(tmp_path, PRUNING, LOW_RANK, PRUNING, {**LOW_RANK, "thresholds": [0.9]})
    assert any(isinstance(m, FactorizedLayer) for m in result.model.modules())
    _reloads(result)


def test_dynamic_int8_quantization_after_low_rank_quantizes_the_factor_layers(tmp_path):
    pytest.importorskip("fedcore_adapter.nodes.quantization")
    result = run_setup(tiny_setup(LOW_RANK, {"kind": "ptq_dynamic"}), low_rank_mlp(), TinyDataModule(),
                       output_dir=tmp_path)
    layer = result.model[2]
    assert isinstance(layer, FactorizedLayer)
    assert layer.first.weight().dtype == torch.qint8 and layer.second.weight().dtype == torch.qint8
    assert result.metrics[-1]["dtype"].startswith("int8")
    _reloads(result)
