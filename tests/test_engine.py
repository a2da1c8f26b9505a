"""The engine: nodes in order, a measured row per node, checkpoints, atomic results, failures and resume."""
import json
from typing import Literal

import pytest
import torch
from torch import nn

from fedcore_adapter import load_model, run_setup
from fedcore_adapter.errors import DataError, FedcoreError, NodeError
from fedcore_adapter.hooks import Hook
from fedcore_adapter.registry import register_node
from fedcore_adapter.schema import NodeConfig
from fedcore_adapter.structure import register_replay
from tests.conftest import TinyEncoder, TokenDataModule, tiny_mlp, tiny_setup
from tests.helpers import EmptyDataModule, NoTrainLoaderDataModule


class _WidenConfig(NodeConfig):
    """Test node with a real structural change: replaces the last Linear by a wider-hidden pair."""

    kind: Literal["test_widen"] = "test_widen"


def _widen(model: nn.Module, hidden: int) -> nn.Module:
    model[2] = nn.Sequential(nn.Linear(model[2].in_features, hidden), nn.Linear(hidden, model[2].out_features))
    return model


@register_replay("test_widen")
def _replay_widen(model, data):
    return _widen(model, data["hidden"])


@register_node(_WidenConfig)
def _apply_widen(model, config, ctx):
    ctx.record_structure("test_widen", {"hidden": 5})
    return _widen(model, 5)


class _FailConfig(NodeConfig):
    kind: Literal["test_fail"] = "test_fail"


@register_node(_FailConfig)
def _apply_fail(model, config, ctx):
    raise NodeError(ctx.node_label, "failed on purpose")


def test_runs_nodes_in_order_and_measures_input_and_every_node(tmp_path, model, dm):
    result = run_setup(tiny_setup({"kind": "training", "epochs": 3}, {"kind": "test_widen"}), model, dm,
                       output_dir=tmp_path)
    rows = result.metrics
    assert [r["node"] for r in rows] == ["input", "training", "test_widen"]
    assert [r["node_index"] for r in rows] == [0, 1, 2]
    for row in rows:
        for column in ("params", "macs", "size_mb", "latency_ms", "latency_ms_per_sample", "throughput_sps",
                       "accuracy", "loss", "device", "dtype"):
            assert row[column] is not None, column
    assert rows[0]["params"] == 8 * 32 + 32 + 32 * 3 + 3
    assert rows[2]["params"] == 8 * 32 + 32 + 32 * 5 + 5 + 5 * 3 + 3
    assert rows[1]["accuracy"] > rows[0]["accuracy"]  # training learned something
    assert rows[1]["latency_ms_per_sample"] == pytest.approx(rows[1]["latency_ms"] / rows[1]["batch_size"])


def test_input_model_is_left_untouched(tmp_path, model, dm):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_setup(tiny_setup({"kind": "training", "epochs": 2}, {"kind": "test_widen"}), model, dm,
                       output_dir=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.model is not model


def test_results_folder_layout(tmp_path, model, dm):
    result = run_setup(tiny_setup(name="LAYOUT"), model, dm, output_dir=tmp_path, model_name="mlp")
    out = result.output_dir
    assert out == tmp_path / "LAYOUT_mlp"
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "run.json", "metrics.json", "metrics.csv", "nodes",
                                               "final"}
    assert sorted(p.name for p in (out / "nodes").iterdir()) == ["0_input", "1_training"]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["completed_nodes"] == 1 and run["error"] is None
    assert not (tmp_path / "LAYOUT_mlp.partial").exists()
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["node_index", "node", "kind", "params"]


def test_size_mb_is_the_checkpoint_file_size(tmp_path, model, dm):
    result = run_setup(tiny_setup(), model, dm, output_dir=tmp_path)
    state = result.output_dir / "nodes" / "1_training" / "state.pt"
    assert result.metrics[1]["size_mb"] == pytest.approx(state.stat().st_size / 2**20)


def test_final_checkpoint_reloads_structure_and_weights_on_a_fresh_model(tmp_path, model, dm):
    result = run_setup(tiny_setup({"kind": "training", "epochs": 1}, {"kind": "test_widen"}), model, dm,
                       output_dir=tmp_path)
    loaded = load_model(result.output_dir, tiny_mlp(seed=123))
    x = torch.randn(4, 8)
    torch.testing.assert_close(loaded(x), result.model.eval()(x))


def test_failed_node_marks_run_failed_keeps_finished_checkpoints_and_no_complete_folder(tmp_path, model, dm):
    with pytest.raises(NodeError, match=r"node 1:test_fail: failed on purpose.*resume=true to continue from node 1"):
        run_setup(tiny_setup({"kind": "training", "epochs": 1}, {"kind": "test_fail"}, name="F"), model, dm,
                  output_dir=tmp_path)
    assert not (tmp_path / "F").exists()
    partial = tmp_path / "F.partial"
    run = json.loads((partial / "run.json").read_text())
    assert run["status"] == "failed" and "failed on purpose" in run["error"] and run["completed_nodes"] == 1
    assert (partial / "nodes" / "1_training" / "state.pt").exists()


def test_resume_refuses_a_setup_that_differs_from_the_interrupted_one(tmp_path, dm):
    with pytest.raises(FedcoreError):
        run_setup(tiny_setup({"kind": "training", "epochs": 1}, {"kind": "test_fail"}, name="R"), tiny_mlp(), dm,
                  output_dir=tmp_path)
    with pytest.raises(FedcoreError, match="cannot resume .*R.partial: the setup differs"):
        run_setup(tiny_setup({"kind": "training", "epochs": 2}, name="R"), tiny_mlp(), dm, output_dir=tmp_path,
                  resume=True)


def test_resume_after_interruption_skips_finished_nodes_and_matches_an_uninterrupted_run(tmp_path, dm, monkeypatch):
    chain = [{"kind": "training", "epochs": 2}, {"kind": "test_widen"}, {"kind": "training", "epochs": 2}]
    full = run_setup(tiny_setup(*chain, name="FULL"), tiny_mlp(), dm, output_dir=tmp_path)

    calls = {"n": 0}
    from fedcore_adapter import registry

    spec = registry.get_node("training")

    def interrupt_second_training(model, config, ctx):
        calls["n"] += 1
        if ctx.node_index == 2 and calls.get("interrupt", True):
            raise KeyboardInterrupt
        return spec.apply(model, config, ctx)

    monkeypatch.setitem(registry._REGISTRY, "training",
                        registry.NodeSpec("training", spec.config_cls, interrupt_second_training))
    with pytest.raises(KeyboardInterrupt):
        run_setup(tiny_setup(*chain, name="FULL2"), tiny_mlp(), dm, output_dir=tmp_path)
    assert json.loads((tmp_path / "FULL2.partial" / "run.json").read_text())["completed_nodes"] == 2

    calls["n"], calls["interrupt"] = 0, False
    resumed = run_setup(tiny_setup(*chain, name="FULL2"), tiny_mlp(), dm, output_dir=tmp_path, resume=True)
    assert calls["n"] == 1  # only the third node ran
    deterministic = ["node", "params", "macs", "size_mb", "accuracy", "loss"]
    for a, b in zip(full.metrics, resumed.metrics):
        assert {k: a[k] for k in deterministic} == pytest.approx({k: b[k] for k in deterministic})
    assert json.loads((tmp_path / "FULL2" / "run.json").read_text())["status"] == "completed"


def test_a_resumed_run_given_a_teacher_teaches_with_it_and_loads_no_other(tmp_path, dm, monkeypatch):
    from fedcore_adapter import engine, registry

    chain = [{"kind": "training", "epochs": 1}, {"kind": "training", "epochs": 1}]
    spec, seen = registry.get_node("training"), {}

    def record_teacher(model, config, ctx):
        if ctx.node_index == 1 and "interrupted" not in seen:
            seen["interrupted"] = True
            raise KeyboardInterrupt
        seen["teacher"] = ctx.teacher
        return spec.apply(model, config, ctx)

    monkeypatch.setitem(registry._REGISTRY, "training", registry.NodeSpec("training", spec.config_cls, record_teacher))
    teacher = tiny_mlp()
    with pytest.raises(KeyboardInterrupt):
        run_setup(tiny_setup(*chain, name="T"), tiny_mlp(), dm, output_dir=tmp_path, teacher=teacher)
    loaded = []
    monkeypatch.setattr(engine, "load_model", lambda folder, model, *a, **k: loaded.append(folder.name) or model)
    run_setup(tiny_setup(*chain, name="T"), tiny_mlp(), dm, output_dir=tmp_path, resume=True, teacher=teacher)
    assert loaded == ["1_training"]  # the finished node's model; not the run's input as a teacher
    assert all(torch.equal(a, b) for a, b in zip(seen["teacher"].state_dict().values(),
                                                 teacher.state_dict().values()))


def test_save_each_writes_intermediate_checkpoints_inside_training(tmp_path, model, dm):
    result = run_setup(tiny_setup({"kind": "training", "epochs": 4}, save_each=2), model, dm, output_dir=tmp_path)
    names = sorted(p.name for p in (result.output_dir / "nodes").iterdir())
    assert "1_training.epoch_0002" in names and "1_training.epoch_0004" in names
    assert load_model(result.output_dir / "nodes" / "1_training.epoch_0004", tiny_mlp()) is not None


def test_unlabeled_dict_batches_get_every_metric_but_accuracy_and_loss(tmp_path):
    result = run_setup(tiny_setup({"kind": "training", "epochs": 1}), TinyEncoder(), TokenDataModule(),
                       output_dir=tmp_path)
    row = result.metrics[1]
    assert row["accuracy"] is None and row["loss"] is None
    assert row["params"] == 50 * 16 + 16 * 16 + 16 and row["macs"] == 6 * 16 * 16


def test_unlabeled_rows_carry_the_cosine_of_each_nodes_model_to_the_runs_input(tmp_path):
    setup = tiny_setup({"kind": "low_rank", "method": {"name": "svd", "thresholds": [0.5], "epochs": 0}},
                       {"kind": "ptq_dynamic"})
    rows = run_setup(setup, TinyEncoder(), TokenDataModule(), output_dir=tmp_path).metrics
    assert rows[0]["cosine"] == pytest.approx(1.0, abs=1e-6)  # the input model against itself
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["cosine"] < 0.99  # a truncation moves the outputs
    assert rows[2]["cosine"] == pytest.approx(rows[1]["cosine"], abs=0.01) and rows[2]["cosine"] != rows[1]["cosine"]


def test_hooks_see_the_run_in_order(tmp_path, model, dm):
    events = []

    class Recorder(Hook):
        def before_run(self, run): events.append("before_run")
        def after_measure_input(self, run, row, checkpoint): events.append("input")
        def before_node(self, run, index, node): events.append(f"before_{index}")
        def on_log(self, run, index, node, metrics, step): events.append(f"log_{index}_{step}")
        def after_node(self, run, index, node, model, row, checkpoint): events.append(f"after_{index}")
        def after_run(self, run, result): events.append("after_run")

    run_setup(tiny_setup({"kind": "training", "epochs": 2}), model, dm, output_dir=tmp_path, hooks=[Recorder()])
    assert events == ["before_run", "input", "before_0", "log_0_1", "log_0_2", "after_0", "after_run"]


def test_a_failing_hook_never_fails_the_run(tmp_path, model, dm):
    class Broken(Hook):
        def after_node(self, *args):
            raise ConnectionError("tracking server down")

    result = run_setup(tiny_setup(), model, dm, output_dir=tmp_path, hooks=[Broken()])
    assert json.loads((result.output_dir / "run.json").read_text())["status"] == "completed"


def test_nan_loss_stops_the_run_with_a_clear_error(tmp_path, model, dm):
    with pytest.raises(NodeError, match=r"loss became nan at epoch 1, batch 1; lower learning_rate"):
        run_setup(tiny_setup({"kind": "training", "epochs": 1, "custom_loss": "tests.test_engine.nan_loss"}),
                  model, dm, output_dir=tmp_path)


def nan_loss(out, target):
    return out.sum() * float("nan")


def test_data_module_without_train_dataloader_is_one_clear_error(tmp_path, model):
    with pytest.raises(DataError, match=r"data module NoTrainLoaderDataModule has no train_dataloader\(\)"):
        run_setup(tiny_setup(), model, NoTrainLoaderDataModule(), output_dir=tmp_path)


def test_empty_training_loader_is_one_clear_error(tmp_path, model):
    with pytest.raises(DataError, match=r"train_dataloader\(\) yielded no batches"):
        run_setup(tiny_setup(), model, EmptyDataModule(), output_dir=tmp_path)


def test_measurement_can_be_switched_off(tmp_path, model, dm):
    result = run_setup(tiny_setup(measure=False), model, dm, output_dir=tmp_path)
    assert "latency_ms" not in result.metrics[1] and result.metrics[1]["wall_s"] > 0
