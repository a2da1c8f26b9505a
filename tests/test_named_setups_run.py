"""Every named setup runs end to end, on the default MNIST-1D CNN and on an unlabeled text encoder.

Budgets are cut with batch limits only (each epoch sees two batches), so the chains and
their node parameters are exactly the shipped ones.
"""
import json

import pytest

from fedcore_adapter.building import run_from_config
from fedcore_adapter.setups import named_setups

LIMITS = {"limit_train_batches": 2, "limit_valid_batches": 2, "limit_test_batches": 2, "latency_repeats": 2,
          "latency_warmup": 1}


@pytest.mark.parametrize("name", sorted(named_setups()))
def test_named_setup_runs_on_the_default_mnist1d_model(name, tmp_path):
    cfg = {"setup": name.lower(), "output_dir": str(tmp_path), "tracking": {"name": "none"}, "common": LIMITS,
           "model": {"_target_": "fedcore_adapter.zoo.models.MNIST1DCNN"},
           "data": {"_target_": "fedcore_adapter.zoo.datamodules.MNIST1DDataModule"}}
    result = run_from_config(cfg)
    assert json.loads((result.output_dir / "run.json").read_text())["status"] == "completed"
    rows = result.metrics
    assert [r["kind"] for r in rows[1:]] == [n.kind for n in result.setup.nodes]
    if name != "RAW":
        assert rows[-1]["params"] < rows[0]["params"] or rows[-1]["size_mb"] < rows[0]["size_mb"]


@pytest.mark.parametrize("name", ["TEST", "PTQ_1"])
def test_named_setup_runs_on_an_unlabeled_encoder_by_distillation(name, tmp_path):
    cfg = {"setup": name, "output_dir": str(tmp_path), "tracking": {"name": "none"}, "common": LIMITS,
           "model": {"_target_": "tests.conftest.TinyEncoder"}, "data": {"_target_": "tests.conftest.TokenDataModule"}}
    result = run_from_config(cfg)
    assert all(r["accuracy"] is None for r in result.metrics)
    assert [r["kind"] for r in result.metrics[1:]] == [n.kind for n in result.setup.nodes]
    assert "int8" in result.metrics[-1]["dtype"]  # both chains end in a real int8 model
