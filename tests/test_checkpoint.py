"""Checkpoints are tensors + a JSON manifest; loading replays structure and never unpickles a module."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from fedcore_adapter.checkpoint import FORMAT, load_model, save_checkpoint
from fedcore_adapter.errors import FedcoreError
from fedcore_adapter.structure import register_replay, transform_record
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


CRAFTED = [
    {"transform": "evil", "module": "os", "data": {}},
    {"transform": "evil", "module": "fedcore_adapter.__main__", "data": {}},
    {"transform": "fedcore_adapter.__main__", "data": {}},
    {"transform": "os", "module": "os", "data": {}},
    {"transform": ["not", "a", "name"], "data": {}},
]


@pytest.mark.parametrize("record", CRAFTED, ids=lambda r: str(r["transform"]) + "@" + str(r.get("module")))
def test_a_crafted_manifest_imports_nothing_and_fails_in_one_line(tmp_path, record):
    """Loading runs no code named by the file: the loader takes no module path from a manifest."""
    folder = tmp_path / "ck"
    save_checkpoint(tiny_mlp(), folder, [])
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "transforms": [record]}))
    probe = (f"import sys, json\n"
             f"from fedcore_adapter.checkpoint import load_model\n"
             f"from fedcore_adapter.errors import FedcoreError\n"
             f"from tests.conftest import tiny_mlp\n"
             f"before = set(sys.modules)\n"
             f"try:\n    load_model({str(folder)!r}, tiny_mlp())\nexcept FedcoreError as err:\n    msg = str(err)\n"
             f"new = sorted(m for m in set(sys.modules) - before if m.startswith(('fedcore_adapter', 'os')))\n"
             f"print(json.dumps({{'msg': msg, 'new': new}}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["new"] == []  # not fedcore_adapter.__main__, not fedcore_adapter.cli, nothing else
    assert "\n" not in result["msg"] and "is not registered" in result["msg"] and "register_replay" in result["msg"]


def test_importing_the_package_main_module_runs_nothing():
    out = subprocess.run([sys.executable, "-c", "import fedcore_adapter.__main__; print('imported')"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "imported", out.stderr


def test_records_of_older_manifests_load_by_their_registered_name(tmp_path):
    """Manifests written before the registry rule carry a module path beside the name: the name is used."""
    model = nn.Sequential(*list(tiny_mlp())[:2])
    old = {"transform": "test_drop_last_layer", "module": "tests.test_checkpoint", "data": {"keep": 2}}
    save_checkpoint(model, tmp_path / "ck", [old])
    torch.testing.assert_close(load_model(tmp_path / "ck", tiny_mlp(seed=9))(torch.ones(2, 8)), model(torch.ones(2, 8)))


def test_a_builtin_change_is_found_by_name_in_a_fresh_process(tmp_path):
    """The built-in names map to this package's modules by code (here: an old pruning record, module field too)."""
    from tests.nodes.test_pruning import ConvDataModule, X, res_conv, run_setup, setup

    result = run_setup(setup({"kind": "pruning", "pruning_ratio": 0.5, "epochs": 0}, measure=False), res_conv(),
                       ConvDataModule(), output_dir=tmp_path)
    manifest_path = result.output_dir / "final" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["transforms"][0]["module"] = "fedcore_adapter.nodes.pruning.history"  # the old format
    manifest_path.write_text(json.dumps(manifest))
    result.model.eval()
    torch.save({"x": X, "y": result.model(X)}, tmp_path / "expected.pt")
    probe = (f"import torch\nfrom fedcore_adapter.checkpoint import load_model\n"
             f"from tests.nodes.test_pruning import res_conv\n"
             f"m = load_model({str(result.output_dir)!r}, res_conv(seed=5))\n"
             f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
             f"torch.testing.assert_close(m(e['x']), e['y'])\nprint('same')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "same", out.stderr


def test_structure_without_a_registered_replay_cannot_be_recorded():
    with pytest.raises(FedcoreError, match="has no registered replay"):
        transform_record("never_registered", {})


def test_saving_replaces_an_existing_checkpoint_atomically(tmp_path):
    save_checkpoint(tiny_mlp(seed=1), tmp_path / "ck", [])
    save_checkpoint(tiny_mlp(seed=2), tmp_path / "ck", [])
    loaded = load_model(tmp_path / "ck", tiny_mlp(seed=3))
    torch.testing.assert_close(loaded[0].weight, tiny_mlp(seed=2)[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
