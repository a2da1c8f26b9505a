"""Checkpoints are tensors + a JSON manifest; loading replays structure and never unpickles a module."""
import json

import pytest
import torch
from torch import nn

from fedcore_adapter.checkpoint import FORMAT, load_model, save_checkpoint
from fedcore_adapter.errors import FedcoreError
from fedcore_adapter.structure import register_replay, replay, transform_record
from tests.conftest import tiny_mlp


@register_replay("test_drop_last_layer")
def _drop_last(model, data):
    return nn.Sequential(*list(model)[: data["keep"]])


def test_round_trip_restores_structure_and_outputs(tmp_path):
    model = nn.Sequential(*list(tiny_mlp())[:2])
    record = transform_record("test_drop_last_layer", {"keep": 2})
    save_checkpoint(model, tmp_path / "ck", [record], {"node": "x"})
    loaded = load_model(tmp_path / "ck", tiny_mlp(seed=9))
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), model(x))


def test_manifest_is_json_and_state_loads_with_weights_only(tmp_path):
    save_checkpoint(tiny_mlp(), tmp_path / "ck", [], {"node": "input"})
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["transforms"] == [] and manifest["meta"] == {"node": "input"}
    state = torch.load(tmp_path / "ck" / "state.pt", weights_only=True)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_a_folder_without_manifest_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FedcoreError, match="is not a checkpoint: manifest.json is missing"):
        load_model(tmp_path, tiny_mlp())


def test_manifest_naming_a_module_outside_the_package_is_refused(tmp_path):
    record = {"transform": "evil", "module": "os", "data": {}}
    with pytest.raises(FedcoreError, match="untrusted module 'os'"):
        replay(tiny_mlp(), [record])


def test_structure_without_a_registered_replay_cannot_be_recorded():
    with pytest.raises(FedcoreError, match="has no registered replay"):
        transform_record("never_registered", {})


def test_saving_replaces_an_existing_checkpoint_atomically(tmp_path):
    save_checkpoint(tiny_mlp(seed=1), tmp_path / "ck", [])
    save_checkpoint(tiny_mlp(seed=2), tmp_path / "ck", [])
    loaded = load_model(tmp_path / "ck", tiny_mlp(seed=3))
    torch.testing.assert_close(loaded[0].weight, tiny_mlp(seed=2)[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
