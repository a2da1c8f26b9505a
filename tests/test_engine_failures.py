"""Every failure during a run is one line naming the node, the cause and what to do; exit 2, run.json failed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcore_adapter import run_setup
from fedcore_adapter.errors import FedcoreError, RunError
from tests.conftest import TinyDataModule, tiny_mlp, tiny_setup
from tests.helpers import BrokenForward, WrongTargetsData

ROOT = Path(__file__).resolve().parents[1]
FAST = ["tracking=none", "model=custom", "model._target_=tests.helpers.build_tiny_mlp", "data=custom",
        "data._target_=tests.helpers.build_tiny_data", "nodes.0.epochs=1", "nodes.0.progress=false",
        "common.latency_repeats=2", "output_dir=out"]


def cli(cwd, *args):
    return subprocess.run([sys.executable, "-m", "fedcore_adapter", *FAST, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


class Pickled:
    """Not a tensor: ``torch.load(weights_only=True)`` refuses a file holding it."""


@pytest.mark.parametrize("args, message", [
    (["data._target_=tests.helpers.build_tiny_data", "+data.n_train=0"],
     r"node .* failed: ValueError: num_samples should be a positive integer value, but got num_samples=0; "
     r"a data loader's dataset is empty"),
    (["model._target_=tests.helpers.BrokenForward"],
     r"node input \(measuring the input model\) failed: ValueError: this model's forward is broken on purpose; "
     r"fix the model, data or setup"),
    (["data._target_=tests.helpers.WrongTargetsData"],
     r"node .* failed: RuntimeError: .*; the model's outputs and the targets do not fit the loss"),
    (["+data.batch_size=0"],
     r"failed: ValueError: batch_size should be a positive integer value.*; batch_size must be 1"),
], ids=["empty-shuffled-dataset", "forward-raises", "wrong-target-shape", "batch-size-0"])
def test_a_failure_during_a_cli_run_is_one_line_exit_2_and_run_json_failed(tmp_path, args, message):
    proc = cli(tmp_path, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "debug=true shows the traceback" in lines[0]
    assert __import__("re").search(message, lines[0]), lines[0]
    [partial] = (tmp_path / "out").glob("*.partial")
    run = json.loads((partial / "run.json").read_text())
    assert run["status"] == "failed" and run["error"] in lines[0] and "Traceback" in run["traceback"]


def test_debug_true_shows_the_traceback_of_a_failure_during_a_run(tmp_path):
    proc = cli(tmp_path, "model._target_=tests.helpers.BrokenForward", "debug=true")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "broken on purpose" in proc.stderr


@pytest.mark.parametrize("where", ["under-a-file", "read-only-filesystem"])
def test_an_output_dir_that_cannot_be_created_is_one_line_and_exit_2(tmp_path, where):
    (tmp_path / "file").write_text("")
    target = str(tmp_path / "file" / "out") if where == "under-a-file" else "/proc/fedcore_results"
    proc = cli(tmp_path, f"output_dir={target}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: output_dir = '{target}': cannot create or write the results folder there")


def test_the_api_raises_run_error_with_the_same_message_and_the_original_as_cause(tmp_path):
    with pytest.raises(RunError) as caught:
        run_setup(tiny_setup(), tiny_mlp(), WrongTargetsData(), output_dir=tmp_path)
    err = caught.value
    assert isinstance(err, FedcoreError) and isinstance(err.__cause__, RuntimeError) and "\n" not in str(err)
    assert str(err).startswith("node ") and "resume=true to continue" in str(err)
    run = json.loads((tmp_path / "T.partial" / "run.json").read_text())
    assert run["status"] == "failed" and run["error"] in str(err)


def test_the_api_names_the_node_of_a_broken_forward(tmp_path):
    with pytest.raises(RunError, match=r"^node input \(measuring the input model\) failed: ValueError") as caught:
        run_setup(tiny_setup(), BrokenForward(), TinyDataModule(), output_dir=tmp_path)
    assert isinstance(caught.value.__cause__, ValueError)


def test_a_data_module_whose_setup_raises_is_one_line(tmp_path):
    class Broken(TinyDataModule):
        def setup(self, stage):
            raise KeyError("no such column")

    with pytest.raises(RunError, match=r"data module Broken: setup\('fit'\) failed: KeyError: 'no such column'"):
        run_setup(tiny_setup(), tiny_mlp(), Broken(), output_dir=tmp_path)


def test_a_pretrained_pickle_is_refused_as_not_a_safe_checkpoint_with_how_to_make_one(tmp_path):
    torch.save({"model": Pickled()}, tmp_path / "model.pt")
    proc = cli(tmp_path, f"pretrained={tmp_path / 'model.pt'}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "is not a safe checkpoint: it holds pickled Python objects" in lines[0]
    assert "torch.save(model.state_dict(), path)" in lines[0] and "weights_only" not in lines[0]


def test_resuming_from_a_tampered_pickle_checkpoint_is_refused_in_one_line(tmp_path, dm):
    with pytest.raises(KeyboardInterrupt):
        run_setup(tiny_setup({"kind": "training", "epochs": 1}, {"kind": "test_interrupt"}, name="I"), tiny_mlp(), dm,
                  output_dir=tmp_path)
    torch.save({"0.weight": Pickled()}, tmp_path / "I.partial" / "nodes" / "1_training" / "state.pt")
    with pytest.raises(FedcoreError, match=r"state.pt is not a safe checkpoint: it holds pickled Python objects "
                                           r"\(it needs tests.test_engine_failures.Pickled\)") as caught:
        run_setup(tiny_setup({"kind": "training", "epochs": 1}, {"kind": "test_interrupt"}, name="I"), tiny_mlp(), dm,
                  output_dir=tmp_path, resume=True)
    assert "weights_only" not in str(caught.value) and "\n" not in str(caught.value)
    assert json.loads((tmp_path / "I.partial" / "run.json").read_text())["status"] == "interrupted"


from typing import Literal  # noqa: E402

from fedcore_adapter.registry import register_node  # noqa: E402
from fedcore_adapter.schema import NodeConfig  # noqa: E402


class _InterruptConfig(NodeConfig):
    kind: Literal["test_interrupt"] = "test_interrupt"


@register_node(_InterruptConfig)
def _apply_interrupt(model, config, ctx):
    raise KeyboardInterrupt
