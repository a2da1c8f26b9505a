"""Building a run: one setup resolution, one pretrained loader, one run-building path for every entry point."""
import pytest
import torch

from fedcore_adapter.errors import ConfigError
from fedcore_adapter.building import build_model, load_pretrained, run_from_config
from fedcore_adapter.zoo.sequences import SeqGRUClassifier
from tests.conftest import tiny_mlp

TINY = {"model": {"_target_": "tests.helpers.build_tiny_mlp"}, "data": {"_target_": "tests.helpers.build_tiny_data"},
        "tracking": {"name": "none"}, "common": {"latency_repeats": 2},
        "nodes": {"0": {"epochs": 2, "progress": False}}}


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
    path.write_text(f"name: PRUNE\nnodes:\n"
                    f"  - {{kind: pruning, pruning_ratio: {ratio}, finetune_params: {{epochs: 0}}}}\n")
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


def test_pretrained_encoder_weights_load_into_seq_encoder_and_pickles_are_refused(tmp_path):
    torch.manual_seed(1)
    source = SeqGRUClassifier()
    torch.save(source.seq_encoder.state_dict(), tmp_path / "encoder.pt")
    torch.save(source.seq_encoder, tmp_path / "pickled.pt")
    model = build_model(seed=42, cfg={"model": {"_target_": "fedcore_adapter.zoo.sequences.SeqGRUClassifier"},
                         "pretrained": str(tmp_path / "encoder.pt")})
    torch.testing.assert_close(model.seq_encoder.state_dict(), source.seq_encoder.state_dict())
    assert not torch.equal(model.head[0].weight, source.head[0].weight)
    with pytest.raises(ConfigError, match=r"pickled.pt is not a safe checkpoint: it holds pickled Python objects .*"
                                          r"never loaded; save tensors only"):
        build_model(seed=42, cfg={"model": {"_target_": "fedcore_adapter.zoo.sequences.SeqGRUClassifier"},
                     "pretrained": str(tmp_path / "pickled.pt")})


def test_a_pickled_module_given_as_pretrained_is_refused_on_the_cli_route_too(tmp_path):
    torch.save(tiny_mlp(), tmp_path / "pickled.pt")
    with pytest.raises(ConfigError, match=r"^pretrained=.*pickled.pt is not a safe checkpoint") as err:
        run_from_config({**TINY, "output_dir": str(tmp_path), "pretrained": str(tmp_path / "pickled.pt")})
    assert "weights_only" not in str(err.value)  # never torch's hint to load it unsafely


def _run_cli_route(tmp_path):
    return run_from_config({**TINY, "output_dir": str(tmp_path)})


def _run_python_api(tmp_path):
    from fedcore_adapter import run_setup
    from tests.conftest import TinyDataModule

    return run_setup("raw", tiny_mlp(), TinyDataModule(), output_dir=tmp_path,
                     overrides={"common": TINY["common"], "nodes": TINY["nodes"]})


def _run_fedcore_fit(tmp_path):
    from fedcore_adapter import fedcore_fit
    from tests.conftest import TinyDataModule

    setup = {"compression_task": "composite_compression", "initial_assumption": ["training_model"],
             "model_params": {"training_model": {"epochs": 1, "progress": False}}, "common": {"save_each": -1}}
    return fedcore_fit(tiny_mlp(), TinyDataModule(), setup, output_folder=str(tmp_path / "RAW"),
                       overrides={"common": TINY["common"]}, limit_train_batches=2)


def _run_train_command(tmp_path):
    from fedcore_adapter.entrypoints.train import run_train

    return run_train({**TINY, "setup": "raw", "output_dir": str(tmp_path), "limit_train_batches": 2})


@pytest.mark.parametrize("route", [_run_cli_route, _run_python_api, _run_fedcore_fit, _run_train_command])
def test_every_entry_point_validates_its_setup_once(tmp_path, monkeypatch, route):
    from fedcore_adapter.schema import Setup

    calls = []
    parse = Setup.parse.__func__
    monkeypatch.setattr(Setup, "parse", classmethod(lambda cls, data: calls.append(data) or parse(cls, data)))
    route(tmp_path)
    assert len(calls) == 1


def test_the_dask_fan_out_plans_with_the_same_resolution_as_the_run():
    from fedcore_adapter.building import config_setup
    from fedcore_adapter.distributed.runs import planned_folder

    cfg = {"setup": "composite_1", "nodes": {"pruning": {"pruning_ratio": 0.3}}, "output_dir": "o"}
    assert planned_folder(cfg).name == config_setup(cfg).name == "COMPOSITE_1"
    with pytest.raises(ConfigError, match="no node of that kind"):
        config_setup({"setup": "raw", "nodes": {"pruning": {"pruning_ratio": 0.3}}})
    assert planned_folder({"setup": "raw", "nodes": {"pruning": {"pruning_ratio": 0.3}}}) is None
