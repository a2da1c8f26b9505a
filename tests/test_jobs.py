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


def prune_setup(folder, ratio: float) -> str:
    path = folder / f"prune_{ratio}.yaml"
    path.write_text(f"name: PRUNE\nnodes:\n  - {{kind: pruning, pruning_ratio: {ratio}, finetune_params: {{epochs: 0}}}}\n")
    return str(path)


def test_a_chain_given_in_place_of_node_overrides_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"nodes = \[.*\]: expected overrides by node index or kind"):
        run_from_config({**TINY, "nodes": [{"kind": "training"}]})


def test_a_run_from_a_compressed_start_point_writes_checkpoints_that_rebuild_from_the_original(tmp_path):
    from fedcore_adapter import load_model

    prune = prune_setup(tmp_path, 0.5)
    first = run_from_config({**TINY, "setup": prune, "nodes": {}, "output_dir": str(tmp_path), "model_name": "a"})
    second = run_from_config({**TINY, "setup": prune, "nodes": {}, "output_dir": str(tmp_path), "model_name": "b",
                              "pretrained": str(first.output_dir)})
    assert second.metrics[-1]["params"] < second.metrics[0]["params"] == first.metrics[-1]["params"]
    rebuilt = load_model(second.output_dir, tiny_mlp())  # a freshly built original: both prunings replayed
    x = torch.randn(8, tiny_mlp()[0].in_features)
    torch.testing.assert_close(rebuilt(x), second.model.eval()(x))


def test_loading_a_checkpoint_into_a_model_of_another_lineage_is_one_clear_error(tmp_path):
    from fedcore_adapter import load_model
    from fedcore_adapter.errors import FedcoreError

    first = run_from_config({**TINY, "setup": prune_setup(tmp_path, 0.5), "nodes": {}, "output_dir": str(tmp_path),
                             "model_name": "a"})
    other = run_from_config({**TINY, "setup": prune_setup(tmp_path, 0.25), "nodes": {}, "output_dir": str(tmp_path),
                             "model_name": "b"})
    with pytest.raises(FedcoreError, match="was not made from this model"):
        load_model(first.output_dir, other.model)
