"""One job from a composed configuration: build, optionally start from a saved model, run."""
import pytest
import torch

from fedcore_adapter.errors import ConfigError
from fedcore_adapter.jobs import load_pretrained, run_from_config
from tests.conftest import tiny_mlp

TINY = {"model": {"_target_": "tests.helpers.build_tiny_mlp"}, "data": {"_target_": "tests.helpers.build_tiny_data"},
        "tracking": {"name": "none"}, "common": {"latency_repeats": 2}, "nodes": {"0": {"epochs": 2, "progress": False}}}


def test_a_job_starts_from_a_pretrained_results_folder(tmp_path):
    first = run_from_config({**TINY, "output_dir": str(tmp_path), "model_name": "a"})
    second = run_from_config({**TINY, "output_dir": str(tmp_path), "model_name": "b",
                              "pretrained": str(first.output_dir), "nodes": {"0": {"epochs": 0}}})
    assert second.metrics[0]["accuracy"] == pytest.approx(first.metrics[-1]["accuracy"])


def test_pretrained_state_dict_file_is_loaded(tmp_path):
    source = tiny_mlp(seed=5)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    loaded = load_pretrained(tiny_mlp(seed=0), str(tmp_path / "w.pt"))
    torch.testing.assert_close(loaded[0].weight, source[0].weight)


def test_pretrained_path_without_a_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"pretrained='.*nothing': no checkpoint there"):
        load_pretrained(tiny_mlp(), str(tmp_path / "nothing"))
