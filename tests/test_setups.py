"""Named setups by name (case-insensitive), setup files, and overrides of their fields."""
import json

import pytest

from fedcore_adapter.errors import ConfigError
from fedcore_adapter.building import resolve_setup as load_setup
from fedcore_adapter.setups import named_setups


def test_named_setup_lookup_is_case_insensitive():
    assert load_setup("raw") == load_setup("RAW") == load_setup("Raw")
    assert "RAW" in named_setups()


def test_raw_is_one_training_node_of_100_epochs_saving_every_10():
    raw = load_setup("RAW")
    assert [(n.kind, n.epochs) for n in raw.nodes] == [("training", 100)]
    assert raw.common.save_each == 10


def test_unknown_name_lists_the_named_setups():
    with pytest.raises(ConfigError, match=r"unknown setup 'nope'; named setups: .*RAW"):
        load_setup("nope")


def test_missing_setup_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"setup file '.*missing\.yaml' does not exist"):
        load_setup(tmp_path / "missing.yaml")


def test_yaml_and_json_files_take_their_stem_as_name(tmp_path):
    (tmp_path / "mine.yaml").write_text("nodes:\n  - kind: training\n    epochs: 2\n")
    (tmp_path / "fed.json").write_text(json.dumps({"initial_assumption": ["training_model"],
                                                   "model_params": {"training_model": {"epochs": 4}}}))
    assert load_setup(tmp_path / "mine.yaml").name == "mine"
    fed = load_setup(str(tmp_path / "fed.json"))
    assert (fed.name, fed.nodes[0].epochs) == ("fed", 4)


def test_invalid_yaml_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("nodes: [\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_setup(tmp_path / "bad.yaml")


def test_overrides_reach_nodes_by_index_and_by_kind_and_common():
    setup = load_setup({"nodes": [{"kind": "training"}, {"kind": "distillation"}, {"kind": "training"}]},
                       {"nodes": {1: {"temperature": 4.0}, "training": {"epochs": 7}}, "common": {"seed": 5}})
    assert [n.epochs for n in setup.nodes] == [7, 1, 7]
    assert setup.nodes[1].temperature == 4.0 and setup.common.seed == 5


def test_a_nested_override_changes_only_the_field_it_names():
    setup = load_setup("COMPOSITE_2", {"nodes": {"low_rank": {"finetune_params": {"learning_rate": 2e-5}}}})
    finetunes = [n.finetune_params for n in setup.nodes if n.kind == "low_rank"]
    assert [(f.epochs, f.learning_rate) for f in finetunes] == [(10, 2e-5), (10, 2e-5)]
    assert load_setup("COMPOSITE_2").nodes[1].finetune_params.learning_rate == 0.001  # the named setup is untouched


def test_override_of_a_missing_node_index_or_kind_is_an_error():
    with pytest.raises(ConfigError, match=r"nodes\.3: the setup has 1 node \(indices 0\.\.0\)"):
        load_setup("RAW", {"nodes": {"3": {"epochs": 1}}})
    with pytest.raises(ConfigError, match=r"nodes\.pruning: no node of that kind.*training"):
        load_setup("RAW", {"nodes": {"pruning": {"pruning_ratio": 0.5}}})


def test_override_by_index_changes_only_that_node_even_when_yaml_anchors_share_it(tmp_path):
    (tmp_path / "anchored.yaml").write_text(
        "nodes:\n  - &t {kind: training, epochs: 2}\n  - *t\n")
    setup = load_setup(tmp_path / "anchored.yaml", {"nodes": {1: {"epochs": 5}}})
    assert [n.epochs for n in setup.nodes] == [2, 5]


def test_every_setup_example_in_the_readme_loads():
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S)]
    setups = [b for b in blocks if isinstance(b, dict) and "nodes" in b]
    assert len(setups) >= 2
    for setup in setups:
        assert load_setup({"name": "README", **setup}).nodes
