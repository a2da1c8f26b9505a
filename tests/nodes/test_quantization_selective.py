"""Selective precision: ``skip`` patterns, the automatic, sensitivity-driven mode, and the bounded note on the layers
a node keeps float because its kernels cannot take them."""
import json
import pickle

import pytest
import torch
from torch import nn

from fedcore_adapter import load_model, run_setup
from fedcore_adapter.data import has_quantized_weights
from fedcore_adapter.errors import NodeError
from fedcore_adapter.nodes.quantization.conv import Int8Conv
from fedcore_adapter.nodes.quantization.modules import DynamicLinear
from tests.conftest import tiny_mlp, tiny_setup
from tests.nodes.test_quantization import run
from tests.nodes.test_quantization_dynamic import OutlierDataModule, outlier_data


def outlier_mlp() -> nn.Module:
    """Layer ``0`` sees a 100x outlier channel (very sensitive to per-tensor activations); ``2`` does not."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def test_skip_patterns_keep_matching_layers_float_and_the_rest_int8(conv_model, conv_dm, tmp_path):
    result = run({"kind": "ptq_dynamic", "allow_conv": True, "skip": ["features.*", "classifier.3"]},
                 conv_model, conv_dm, tmp_path)
    assert type(result.model.features[0]) is nn.Conv1d and type(result.model.features[3]) is nn.Conv1d
    assert type(result.model.features[1]) is nn.BatchNorm1d  # nothing folded into a float conv
    assert isinstance(result.model.classifier[1], DynamicLinear) and type(result.model.classifier[3]) is nn.Linear
    x = conv_dm.test[:][0]
    from tests.nodes.test_quantization import TinyConvNet

    assert torch.equal(load_model(result.output_dir, TinyConvNet(seed=1))(x), result.model(x))


def test_static_skip_keeps_the_layer_float_inside_the_int8_graph(conv_model, conv_dm, tmp_path):
    result = run({"kind": "ptq_static", "skip": ["classifier.1"]}, conv_model, conv_dm, tmp_path)
    kept = result.model.classifier.get_submodule("1")  # float Linear(+ReLU fused in float)
    assert type(kept[0]) is nn.Linear and kept[0].weight.dtype == torch.float32
    assert any(type(m).__module__.startswith("torch.ao.nn.intrinsic.quantized") for m in result.model.modules())


def test_a_skip_pattern_that_matches_no_layer_is_refused_listing_the_layers(dm, tmp_path):
    with pytest.raises(NodeError, match=r"skip pattern 'encoder\.\*' matches no quantizable layer \(layers: 0, 2\)"):
        run({"kind": "ptq_dynamic", "skip": ["encoder.*"]}, tiny_mlp(), dm, tmp_path)


def test_skipping_every_layer_is_refused(dm, tmp_path):
    with pytest.raises(NodeError, match=r"match all 2 quantizable layers; nothing would be quantized"):
        run({"kind": "ptq_static", "skip": ["*"]}, tiny_mlp(), dm, tmp_path)


def sensitivity_report(result) -> dict:
    return json.loads((result.output_dir / "final" / "sensitivity.json").read_text())


def test_auto_mode_keeps_the_most_sensitive_layer_float_to_meet_the_budget(tmp_path):
    model = outlier_mlp()
    result = run({"kind": "ptq_dynamic", "auto_skip": {"error_budget": 1e-4}}, model, OutlierDataModule(), tmp_path)
    report = sensitivity_report(result)
    assert list(report["sensitivity"]) == ["0", "2"]  # ranked, most sensitive first
    assert report["sensitivity"]["0"] > 10 * report["sensitivity"]["2"]
    assert report["kept_float"] == ["0"] and report["budget_met"] and report["error"] <= 1e-4
    assert type(result.model[0]) is nn.Linear and isinstance(result.model[2], DynamicLinear)
    x = outlier_data()
    assert torch.equal(load_model(result.output_dir, outlier_mlp())(x), result.model(x))


def test_auto_mode_keeps_nothing_float_when_the_budget_allows(tmp_path):
    result = run({"kind": "ptq_dynamic", "auto_skip": {"error_budget": 0.05}}, outlier_mlp(), OutlierDataModule(),
                 tmp_path)
    assert sensitivity_report(result)["kept_float"] == []
    assert isinstance(result.model[0], DynamicLinear)


def test_an_unreachable_budget_is_reported_and_one_layer_still_runs_int8(tmp_path):
    result = run({"kind": "ptq_dynamic", "auto_skip": {"error_budget": 1e-9}}, outlier_mlp(), OutlierDataModule(),
                 tmp_path)
    report = sensitivity_report(result)
    assert not report["budget_met"] and report["kept_float"] == ["0"]
    assert isinstance(result.model[2], DynamicLinear)


def test_bisection_finds_the_fewest_float_layers_among_many(conv_model, conv_dm, tmp_path):
    budget = 1e-5
    result = run({"kind": "ptq_static", "auto_skip": {"error_budget": budget, "batches": 1}}, conv_model, conv_dm,
                 tmp_path)
    report = sensitivity_report(result)
    ranked, k = list(report["sensitivity"]), len(report["kept_float"])
    assert len(ranked) == 4 and report["kept_float"] == ranked[:k] and report["budget_met"]
    probes = {int(n): e for n, e in report["probes"].items()}
    assert 1 <= k < 4 and probes[k] <= budget < probes[k - 1]  # k works, k - 1 does not


def test_qat_auto_mode_ranks_layers_before_training_and_keeps_the_chosen_ones_float(conv_model, conv_dm, tmp_path):
    from tests.nodes.test_quantization import TinyConvNet

    node = {"kind": "qat", "epochs": 1, "auto_skip": {"error_budget": 1e-5, "batches": 1}}
    result = run(node, conv_model, conv_dm, tmp_path)
    report = sensitivity_report(result)
    kept = report["kept_float"]
    assert 1 <= len(kept) < 4 and kept == list(report["sensitivity"])[:len(kept)]
    for name in report["sensitivity"]:  # float exactly where chosen (a kept conv stays fused with its BatchNorm)
        assert has_quantized_weights(result.model.get_submodule(name)) != (name in kept), name
    x = conv_dm.test[:8][0]
    assert torch.equal(load_model(result.output_dir, TinyConvNet(seed=4))(x), result.model(x))


class PicklingExecutor:
    """Stands in for the Dask cluster: every task must survive pickling."""

    def __init__(self):
        self.tasks = 0

    def map(self, fn, items):
        fn = pickle.loads(pickle.dumps(fn))
        self.tasks += len(items)
        return [fn(pickle.loads(pickle.dumps(item))) for item in items]


def test_layer_sensitivities_are_independent_picklable_tasks_for_the_cluster(tmp_path):
    executor = PicklingExecutor()
    run_setup(tiny_setup({"kind": "ptq_dynamic", "auto_skip": {"error_budget": 1e-4}}, measure=False), outlier_mlp(),
              OutlierDataModule(), output_dir=tmp_path, executor=executor)
    assert executor.tasks == 2  # one per quantizable layer


def test_the_note_on_layers_kept_float_names_a_few_counts_the_rest_and_the_report_lists_them_all(conv_dm, tmp_path):
    torch.manual_seed(0)
    depthwise = [nn.Conv1d(8, 8, 3, padding=1, groups=8) for _ in range(6)]
    reflect = nn.Conv1d(8, 8, 3, padding=1, padding_mode="reflect")
    model = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), *depthwise, reflect, nn.Flatten(), nn.Linear(8 * 16, 3)).eval()
    result = run({"kind": "ptq_dynamic", "allow_conv": True}, model, conv_dm, tmp_path)
    grouped = "grouped/depthwise conv (groups > 1): the int8 conv kernel takes groups=1 only; ptq_static quantizes it"
    assert result.metrics[1]["note"] == (f"layers kept in float: 1, 2, 3, 4 and 2 more ({grouped}); "
                                         f"1 more for other reasons (all in kept_float.json)")
    report = json.loads((result.output_dir / "final" / "kept_float.json").read_text())
    assert report == {**{str(i): grouped for i in range(1, 7)},
                      "7": "padding_mode='reflect': the int8 conv kernel pads with zeros only"}
    assert isinstance(result.model[0], Int8Conv) and isinstance(result.model[9], DynamicLinear)
