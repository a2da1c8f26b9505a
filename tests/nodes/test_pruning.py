"""The ``pruning`` node: real channel removal, FedCore names, iterations, chains, checkpoints and bad input."""
import copy
import json
from typing import Literal

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcore_adapter import load_model, run_setup
from fedcore_adapter.context import NodeContext
from fedcore_adapter.errors import ConfigError, NodeError
from fedcore_adapter.hooks import Hook
from fedcore_adapter.nodes.pruning import PruningConfig, PruningWarning, apply_pruning
from fedcore_adapter.nodes.pruning.backend import make_pruner
from fedcore_adapter.nodes.pruning.history import History
from fedcore_adapter.registry import register_node
from fedcore_adapter.schema import CommonConfig, NodeConfig
from fedcore_adapter.structure import register_replay


class ResConv1d(nn.Module):
    """Conv1d + BatchNorm + a residual block + linear classifier: ``[N, 1, 16]`` -> 3 logits."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, width, 3, padding=1, bias=False), nn.BatchNorm1d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv1d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm1d(2 * width),
                                   nn.ReLU(), nn.Conv1d(2 * width, width, 3, padding=1, bias=False),
                                   nn.BatchNorm1d(width))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.block(x)))


def res_conv(seed: int = 0, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return ResConv1d(width)


class ConvDataModule:
    """Sequences of length 16 whose class is the position of their largest bump (third of the sequence)."""

    def __init__(self, n_train: int = 96, batch_size: int = 16):
        g = torch.Generator().manual_seed(0)

        def make(n):
            x = torch.randn(n, 1, 16, generator=g) * 0.3
            y = torch.randint(0, 3, (n,), generator=g)
            x[torch.arange(n), 0, y * 5 + 2] += 2.0
            return TensorDataset(x, y)

        self.train, self.val, self.test = make(n_train), make(32), make(32)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=self.batch_size)


def setup(*nodes, measure=True, **common):
    return {"name": "P", "common": {"latency_repeats": 2, "latency_warmup": 1, "measure": measure, **common},
            "nodes": list(nodes)}


def node_context(dm, tmp_path, teacher, **common) -> NodeContext:
    return NodeContext(train_loader=dm.train_dataloader(), val_loader=dm.val_dataloader(),
                       test_loader=dm.test_dataloader(), loss_fn=nn.CrossEntropyLoss(), device=torch.device("cpu"),
                       teacher=teacher, output_dir=tmp_path / "work", common=CommonConfig(**common),
                       node_label="0:pruning")


def same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


X = torch.randn(5, 1, 16)


# -- real removal, measured ------------------------------------------------------------------------
def test_pruning_removes_channels_for_real_so_params_macs_and_bytes_fall(tmp_path):
    result = run_setup(setup({"kind": "pruning", "pruning_ratio": 0.5}), res_conv(), ConvDataModule(),
                       output_dir=tmp_path)
    before, after = result.metrics
    assert result.model.stem[0].out_channels == 4 and result.model.block[0].out_channels == 8
    assert result.model.head[1].in_features == 4 * 16 and result.model.head[1].out_features == 8
    assert after["params"] < 0.4 * before["params"]
    assert after["macs"] < 0.4 * before["macs"]
    assert after["size_mb"] < 0.6 * before["size_mb"]  # (torch.save adds a fixed overhead per tensor)
    assert after["sparsity"] == 0.0  # channels are gone, not zeroed
    assert result.model(X).shape == (5, 3)


def test_checkpoint_holds_the_history_and_reloads_onto_a_fresh_model(tmp_path):
    result = run_setup(setup({"kind": "pruning", "pruning_ratio": 0.5, "pruning_iterations": 2, "epochs": 1},
                             measure=False), res_conv(), ConvDataModule(), output_dir=tmp_path)
    manifest = json.loads((result.output_dir / "final" / "manifest.json").read_text())
    [record] = manifest["transforms"]
    assert record["transform"] == "pruning" and "module" not in record  # a registered name only
    assert {op["module"] for op in record["data"]["ops"]} >= {"stem.0", "stem.1", "block.0", "head.1", "head.3"}
    reloaded = load_model(result.output_dir, res_conv(seed=5))
    assert same_outputs(reloaded, result.model, X)
    report = json.loads((result.output_dir / "final" / "pruning_report.json").read_text())
    assert report["backend"] == "GraphPruner" and report["params_after"] < report["params_before"]


# -- options ---------------------------------------------------------------------------------------
def test_fedcore_pruning_model_parameters_map_onto_the_node():
    config = PruningConfig.model_validate({
        "kind": "pruning", "epochs": 5, "pruning_iterations": 5, "learning_rate": 0.01,
        "importance": "MagnitudeImportance", "pruner_name": "magnitude_pruner", "importance_norm": 1,
        "pruning_ratio": 0.75, "finetune_params": {"epochs": 10, "custom_loss": None}})
    assert (config.importance, config.importance_norm, config.pruning_ratio) == ("magnitude", 1.0, 0.75)
    assert [config.step_params(last=i == 4).epochs for i in range(5)] == [5, 5, 5, 5, 10]
    assert config.finetune_params.learning_rate == 0.01  # inherits the node's learning rate
    assert PruningConfig(pruning_iterations=3, epochs=2).total_finetune_epochs() == 6
    slimming = PruningConfig.model_validate({"kind": "pruning", "pruner_name": "batch_norm_pruner"})
    assert (slimming.importance, slimming.bn_sparsity) == ("bn_scale", 1e-4)


def test_a_fedcore_format_setup_runs_the_pruning_model(tmp_path):
    fedcore = {"compression_task": "composite_compression", "need_pretrain": False, "common": {"save_each": -1},
               "model_params": {"pruning_model": {
                   "epochs": 1, "pruning_iterations": 2, "learning_rate": 0.001, "importance": "MagnitudeImportance",
                   "pruner_name": "magnitude_pruner", "importance_norm": 1, "pruning_ratio": 0.75,
                   "finetune_params": {"epochs": 1, "custom_loss": None}}},
               "initial_assumption": ["pruning_model"]}
    result = run_setup(fedcore, res_conv(), ConvDataModule(), output_dir=tmp_path,
                       overrides={"common": {"measure": False}})
    assert result.model.stem[0].out_channels == 2  # int(8 * 0.25)


@pytest.mark.parametrize("value", [
    {"kind": "pruning", "pruning_ratio": 0.5},
    {"kind": "pruning", "pruning_ratio": {"stem.0": 0.25}, "importance": "lamp", "global_pruning": True, "round_to": 2,
     "ignored_layers": ["head.1"], "finetune_params": {"epochs": 1}},
])
def test_config_round_trips_through_json(value):
    config = PruningConfig.model_validate(value)
    assert PruningConfig.model_validate_json(config.model_dump_json()) == config


def test_importance_norm_is_honoured():
    """Channel A = [3, 0, 0, 0], B = [1, 1, 1, 1]: L1 removes A (3 < 4), L2 removes B (4 < 9)."""
    removed = {}
    for p in (1, 2):
        model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor([[3.0, 0, 0, 0], [1.0, 1, 1, 1]]))
            model[2].weight.fill_(1.0)
        history = History()
        make_pruner(model, torch.randn(2, 4), label="t", ratio=0.5, importance_norm=p).step(history)
        removed[p] = next(op["idxs"] for op in history.ops if op["module"] == "0")
    assert removed == {1: [0], 2: [1]}


def test_taylor_importance_ranks_by_weight_times_gradient_not_by_magnitude():
    """Hidden unit 2 has the largest weights but zero gradient: Taylor removes it, magnitude keeps it."""
    removed = {}
    for importance in ("magnitude", "taylor"):
        model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 1, bias=False))
        with torch.no_grad():
            model[0].weight.fill_(1.0), model[0].weight[2].mul_(5.0), model[2].weight.fill_(1.0)
        model[0].weight.grad, model[2].weight.grad = torch.ones(4, 4), torch.ones(1, 4)
        model[0].weight.grad[2], model[2].weight.grad[:, 2] = 0.0, 0.0
        history = History()
        make_pruner(model, torch.randn(2, 4), label="t", ratio=0.25, importance=importance).step(history)
        removed[importance] = next(op["idxs"] for op in history.ops if op["module"] == "0")
    assert removed["taylor"] == [2] and removed["magnitude"] != [2]


@pytest.mark.parametrize("common, override, expected", [({}, None, 16), ({"limit_valid_batches": 2}, None, 2),
                                                        ({"limit_valid_batches": 2}, 3, 3)])
def test_taylor_gradients_use_limit_valid_batches_calibration_batches(tmp_path, monkeypatch, common, override,
                                                                    expected):
    from fedcore_adapter.nodes.pruning import node as node_module

    used = []
    real = node_module.accumulate_gradients
    monkeypatch.setattr(node_module, "accumulate_gradients",
                        lambda model, batches, *a: used.append(real(model, list(batches), *a)))
    dm = ConvDataModule(n_train=16 * 20)  # 20 batches available
    model = res_conv()
    apply_pruning(model, PruningConfig(importance="taylor", pruning_iterations=2, calibration_batches=override),
                  node_context(dm, tmp_path, model, **common))
    assert used == [expected, expected]  # once before each pruning step


def test_global_pruning_takes_more_from_the_layer_with_weak_channels():
    """Layer 0's channels are all alike, six of layer 2's are tiny: per layer both lose half, globally layer 2 pays."""
    def mlp():
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        with torch.no_grad():
            for layer in (model[0], model[2], model[4]):
                layer.weight.fill_(1.0), layer.bias.zero_()
            model[2].weight[:6].mul_(0.01)
        return model

    widths = {}
    for global_pruning in (False, True):
        model = mlp()
        make_pruner(model, torch.randn(2, 4), label="t", ratio=0.5, global_pruning=global_pruning).step(History())
        widths[global_pruning] = (model[0].out_features, model[2].out_features)
    assert widths[False] == (4, 4)
    assert widths[True][0] > 4 and widths[True][1] < 4


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "lamp", "bn_scale", "random"])
def test_every_importance_prunes_a_batchnorm_convnet(tmp_path, importance):
    model = res_conv()
    out = apply_pruning(model, PruningConfig(pruning_ratio=0.5, importance=importance),
                        node_context(ConvDataModule(), tmp_path, model, limit_valid_batches=2))
    assert out.stem[0].out_channels == 4 and out(X).shape == (5, 3)


def test_iterations_reach_the_ratio_gradually_with_fine_tuning_between(tmp_path):
    class Epochs(Hook):
        tags: list = []

        def on_log(self, run, index, node, metrics, step):
            self.tags.extend(k.split("_train_loss")[0] for k in metrics if k.endswith("_train_loss"))

    result = run_setup(setup({"kind": "pruning", "pruning_ratio": 0.5, "pruning_iterations": 2, "epochs": 1,
                              "schedule": "linear", "finetune_params": {"epochs": 2}}, measure=False),
                       res_conv(), ConvDataModule(), output_dir=tmp_path, hooks=[hook := Epochs()])
    assert hook.tags == ["finetune_1", "finetune_2", "finetune_2"]
    ops = json.loads((result.output_dir / "final" / "manifest.json").read_text())["transforms"][0]["data"]["ops"]
    stem_steps = [len(op["idxs"]) for op in ops if op["module"] == "stem.0"]
    assert stem_steps == [2, 2]  # 8 -> 6 -> 4 channels


def test_global_pruning_ranks_across_layers_and_round_to_keeps_multiples(tmp_path):
    model = res_conv()
    out = apply_pruning(model, PruningConfig(pruning_ratio=0.5, global_pruning=True),
                        node_context(ConvDataModule(), tmp_path, model))
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in model.parameters())
    rounded = apply_pruning(model, PruningConfig(pruning_ratio=0.4, round_to=4),
                            node_context(ConvDataModule(), tmp_path, model))
    assert rounded.block[0].out_channels % 4 == 0 and rounded.head[1].out_features % 4 == 0


def test_per_layer_ratios_and_ignored_layers(tmp_path):
    model = res_conv()
    out = apply_pruning(model, PruningConfig(pruning_ratio={"block.0": 0.75}),
                        node_context(ConvDataModule(), tmp_path, model))
    assert (out.stem[0].out_channels, out.block[0].out_channels, out.head[1].out_features) == (8, 4, 16)
    kept = apply_pruning(model, PruningConfig(pruning_ratio=0.5, ignored_layers=["head"]),
                         node_context(ConvDataModule(), tmp_path, model))
    assert kept.head[1].out_features == 16 and kept.block[0].out_channels == 8


def test_one_ratio_for_the_model_keeps_layers_it_would_empty_whole_with_a_warning(tmp_path):
    model = nn.Sequential(nn.Linear(16, 2), nn.ReLU(), nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    dm = ConvDataModule()
    dm.train = TensorDataset(torch.randn(32, 16), torch.randint(0, 3, (32,)))
    with pytest.warns(PruningWarning, match=r"pruning ratio 0\.6 would remove every channel of '0' \(2 channels\); "
                                            r"kept whole"):
        out = apply_pruning(model, PruningConfig(pruning_ratio=0.6), node_context(dm, tmp_path, model))
    assert (out[0].out_features, out[2].out_features) == (2, 3)  # int(8 * 0.4) = 3 kept


# -- chains ----------------------------------------------------------------------------------------
def test_chained_pruning_prunes_the_model_it_receives(tmp_path):
    result = run_setup(setup({"kind": "pruning", "pruning_ratio": 0.5}, {"kind": "pruning", "pruning_ratio": 0.5},
                             measure=False), res_conv(), ConvDataModule(), output_dir=tmp_path)
    assert result.model.stem[0].out_channels == 2  # 8 -> 4 -> 2
    assert same_outputs(load_model(result.output_dir, res_conv(seed=3)), result.model, X)


class _FactorHeadConfig(NodeConfig):
    """Test node: replaces ``head.1`` by a Linear pair (a factorised layer), with a replay."""

    kind: Literal["test_factor_head"] = "test_factor_head"


def _factor_head(model: nn.Module) -> nn.Module:
    old = model.head[1]
    model.head[1] = nn.Sequential(nn.Linear(old.in_features, 6, bias=False), nn.Linear(6, old.out_features))
    return model


@register_replay("test_factor_head")
def _replay_factor_head(model, data):
    return _factor_head(model)


@register_node(_FactorHeadConfig)
def _apply_factor_head(model, config, ctx):
    ctx.record_structure("test_factor_head", {})
    return _factor_head(model)


def test_pruning_after_a_structural_node_replays_both_in_order(tmp_path):
    result = run_setup(setup({"kind": "test_factor_head"}, {"kind": "pruning", "pruning_ratio": 0.5}, measure=False),
                       res_conv(), ConvDataModule(), output_dir=tmp_path)
    assert result.model.head[1][0].out_features == 3  # the factor's inner width was pruned too
    assert same_outputs(load_model(result.output_dir, res_conv(seed=4)), result.model, X)


# -- bad input: one line naming node and layer, input untouched --------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, state):
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("field, value, message", [
    ("pruning_ratio", 1.0, r"nodes\[0\] \(pruning\)\.pruning_ratio = 1\.0: .*must be in \[0, 1\)"),
    ("pruning_ratio", -0.1, r"pruning_ratio = -0\.1: .*must be in \[0, 1\)"),
    ("importance", "HessianImportance",
     r"\.importance = 'HessianImportance': .*valid: magnitude, taylor, lamp, bn_scale, random"),
    ("pruner_name", "growing_reg_pruner", r"unknown pruner_name 'growing_reg_pruner'; valid: magnitude_pruner"),
])
def test_bad_options_fail_validation_with_one_line(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        run_setup(setup({"kind": "pruning", field: value}), res_conv(), ConvDataModule(), output_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_a_head_ratio_beside_per_layer_ratios_is_refused_instead_of_ignored(tmp_path):
    node = {"kind": "pruning", "pruning_ratio": {"block.0": 0.5}, "head_pruning_ratio": 0.25}
    with pytest.raises(ConfigError, match=r"head_pruning_ratio = 0\.25 applies only with one pruning_ratio") as err:
        run_setup(setup(node), res_conv(), ConvDataModule(), output_dir=tmp_path)
    assert "\n" not in str(err.value) and "nodes[0] (pruning)" in str(err.value)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3)
        self.weird = _NumpyLayer()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.weird(self.conv(x)).mean(-1))


class _NumpyLayer(nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.numpy())  # leaves autograd: cannot be traced


@pytest.mark.parametrize("make_model, config, message", [
    (lambda: nn.Sequential(nn.Linear(16, 2), nn.ReLU(), nn.Linear(2, 3)), {"pruning_ratio": {"0": 0.6}},
     r"node 0:pruning: pruning ratio 0\.6 would remove every channel of layer '0' \(2 channels\); "
     r"use a ratio below 0\.5"),
    (res_conv, {"pruning_ratio": {"nope": 0.5}}, r"pruning_ratio names layer 'nope', which the model does not have"),
    (res_conv, {"ignored_layers": ["head.9"]}, r"ignored_layers names layer 'head\.9', which the model does not have"),
    (lambda: nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)), {"importance": "bn_scale"},
     r"importance 'bn_scale' .* has no BatchNorm layer"),
    (_Untraceable, {},
     r"node 0:pruning: cannot trace the model for pruning in layer 'weird' \(_NumpyLayer\): RuntimeError"),
])
def test_bad_input_raises_one_line_naming_node_and_layer_and_leaves_the_model_untouched(tmp_path, make_model, config,
                                                                                        message):
    model = make_model()
    state = _state(model)
    x = torch.randn(96, 1, 16) if not isinstance(model, nn.Sequential) else torch.randn(96, 16)
    dm = ConvDataModule()
    dm.train = TensorDataset(x, torch.randint(0, 2, (96,)))
    with pytest.raises(NodeError, match=message) as err:
        apply_pruning(model, PruningConfig(**config), node_context(dm, tmp_path, copy.deepcopy(model)))
    assert "\n" not in str(err.value)
    _assert_untouched(model, state)


def test_a_factor_pair_is_recognised_by_its_first_and_second_layers_only():
    from fedcore_adapter.nodes.pruning.factors import factor_part, first_factors_of

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(8, 2), nn.Linear(2, 8)

    pair, plain = Pair(), nn.Sequential(nn.Linear(8, 8))
    model = nn.Sequential(pair, plain)
    assert factor_part(pair, "first") is pair.first and factor_part(pair, "second") is pair.second
    assert factor_part(plain, "first") is None and factor_part(plain[0], "second") is None
    assert first_factors_of(model, [pair.second]) == [pair.first]
    assert first_factors_of(model, [pair.first, plain[0]]) == []
