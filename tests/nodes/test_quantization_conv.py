"""Dynamic int8 convolutions (``ptq_dynamic allow_conv``): a real int8 kernel, ReLU fused, plans replayed; the
convolutions that kernel cannot take stay float and the metrics row says so."""
import json
import logging
import re

import pytest
import torch
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig

from fedcore_adapter import load_model
from fedcore_adapter.errors import NodeError
from fedcore_adapter.nodes.quantization import conv as conv_module
from fedcore_adapter.nodes.quantization.config import PTQDynamicConfig
from fedcore_adapter.nodes.quantization.conv import Int8Conv, has_onednn_qconv
from fedcore_adapter.nodes.quantization.dynamic import make_plan, swap_dynamic_
from fedcore_adapter.nodes.quantization.modules import DynamicConv, DynamicLinear
from fedcore_adapter.nodes.quantization.selective import quantizable_layers
from tests.nodes.test_quantization import BranchyNet, TinyConvNet, run

needs_onednn = pytest.mark.skipif(not has_onednn_qconv(), reason="no oneDNN int8 convolution in this torch build")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().pow(2).sum() / b.detach().pow(2).sum())


def int8_conv(conv: nn.Module, relu: bool = False) -> Int8Conv:
    conv.qconfig = per_channel_dynamic_qconfig
    return Int8Conv.from_conv(conv, relu=relu)


CASES = [(nn.Conv1d(8, 16, 3, padding=1, stride=2), (4, 8, 20)), (nn.Conv2d(3, 16, 3, padding=1), (2, 3, 9, 9)),
         (nn.Conv1d(4, 6, 5, dilation=2, bias=False), (3, 4, 30))]


@needs_onednn
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=["conv1d", "conv2d", "dilated"])
def test_int8_conv_runs_onednns_int8_kernel_and_no_float_convolution(case, relu):
    torch.manual_seed(0)
    conv, shape = CASES[case]
    quantized, x = int8_conv(conv, relu), torch.randn(shape)
    with torch.profiler.profile() as prof:
        y = quantized(x)
    ops = {e.key for e in prof.key_averages()}
    assert any(op.startswith("onednn::qconv") for op in ops)
    assert not ops & {"aten::convolution", "aten::mkldnn_convolution", "aten::conv1d", "aten::conv2d"}
    expected = torch.relu(conv(x)) if relu else conv(x)
    assert y.shape == expected.shape and y.is_contiguous()
    assert relative_error(y, expected) < 1e-3
    assert quantized.qweight.dtype == torch.int8 and quantized.weight().is_quantized


@pytest.mark.parametrize("case", range(len(CASES)), ids=["conv1d", "conv2d", "dilated"])
def test_without_onednn_the_same_numbers_come_from_im2col_and_int_mm(case, monkeypatch):
    torch.manual_seed(0)
    conv, shape = CASES[case]
    quantized, x = int8_conv(conv, relu=True), torch.randn(shape)
    native = quantized(x)
    monkeypatch.setattr(conv_module, "has_onednn_qconv", lambda: False)
    with torch.profiler.profile() as prof:
        fallback = quantized(x)
    assert "aten::_int_mm" in {e.key for e in prof.key_averages()}
    torch.testing.assert_close(fallback, native, atol=1e-5, rtol=1e-5)


def test_the_relu_after_each_conv_runs_inside_it_and_the_plan_records_it(conv_model, conv_dm, tmp_path):
    result = run({"kind": "ptq_dynamic", "allow_conv": True}, conv_model, conv_dm, tmp_path)
    plan = json.loads((result.output_dir / "final" / "manifest.json").read_text())["transforms"][-1]["data"]
    assert plan["conv_kernel"] == "int8_conv"
    assert plan["fused_relu"] == [["features.0", "features.2"], ["features.3", "features.5"]]
    assert plan["channels_last"] == ["features.0"]  # conv 2 feeds Flatten, which must get a contiguous tensor
    features = result.model.features
    assert features[0].relu and features[3].relu and isinstance(features[2], nn.Identity)
    x = conv_dm.test[:][0]
    assert relative_error(result.model(x), conv_model(x)) < 2e-3
    assert torch.equal(load_model(result.output_dir, TinyConvNet(seed=7))(x), result.model(x))


def test_a_model_torch_fx_cannot_trace_gets_its_relus_fused_from_sequential_order(conv_model, conv_dm, tmp_path):
    model = BranchyNet()
    model.load_state_dict(conv_model.state_dict())
    result = run({"kind": "ptq_dynamic", "allow_conv": True}, model.eval(), conv_dm, tmp_path)
    assert result.model.features[0].relu and result.model.features[3].relu
    x = conv_dm.test[:][0]
    assert relative_error(result.model(x), model(x)) < 2e-3


class SharedReluNet(nn.Module):
    """One ReLU module used after both convs, a ``view`` of the last conv's output, a residual read."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.c3 = nn.Conv1d(1, 8, 3, padding=1), nn.Conv1d(8, 8, 3, padding=1), nn.Conv1d(8, 4, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        h = self.relu(self.c1(x))
        h = self.relu(self.c2(h)) + h  # c1's output is read by c2 and by the add
        return self.fc(self.c3(h).view(x.shape[0], -1))  # view: needs a contiguous tensor


def test_shared_relus_stay_modules_and_outputs_read_elsewhere_are_contiguous(conv_dm, tmp_path):
    model = SharedReluNet().eval()
    result = run({"kind": "ptq_dynamic", "allow_conv": True}, model, conv_dm, tmp_path)
    plan = json.loads((result.output_dir / "final" / "manifest.json").read_text())["transforms"][-1]["data"]
    assert plan["fused_relu"] == [] and isinstance(result.model.relu, nn.ReLU)
    assert plan["channels_last"] == []
    x = conv_dm.test[:][0]
    assert relative_error(result.model(x), model(x)) < 2e-3


def test_plans_written_before_int8_conv_still_replay_the_im2col_convolutions(conv_model):
    model = TinyConvNet()
    model.load_state_dict(conv_model.state_dict())
    model.eval()
    plan = make_plan(model, quantizable_layers(model, ["linear", "conv"]), frozenset(),
                     PTQDynamicConfig(allow_conv=True))
    old = {k: v for k, v in plan.items() if k not in ("conv_kernel", "fused_relu", "channels_last")}
    replayed = swap_dynamic_(model, old)
    assert isinstance(replayed.features[0], DynamicConv) and isinstance(replayed.features[2], nn.ReLU)


class GroupedConvNet(nn.Module):
    """A plain conv, a depthwise and a grouped one (the int8 conv kernel takes groups=1 only), a Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.plain = nn.Conv1d(1, 8, 3, padding=1)
        self.depthwise = nn.Conv1d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 16, 3)

    def forward(self, x):
        return self.fc(self.grouped(torch.relu(self.depthwise(torch.relu(self.plain(x))))).flatten(1))


GROUPED_WHY = "grouped/depthwise conv (groups > 1): the int8 conv kernel takes groups=1 only; ptq_static quantizes it"


def test_grouped_and_depthwise_convs_stay_float_named_with_why_in_the_metrics_row_and_one_warning(conv_dm, tmp_path,
                                                                                                   caplog):
    model = GroupedConvNet().eval()
    with caplog.at_level(logging.WARNING, logger="fedcore_adapter"):
        result = run({"kind": "ptq_dynamic", "allow_conv": True}, model, conv_dm, tmp_path)
    assert type(result.model.depthwise) is nn.Conv1d and type(result.model.grouped) is nn.Conv1d
    assert isinstance(result.model.plain, Int8Conv) and isinstance(result.model.fc, DynamicLinear)
    note = result.metrics[1]["note"]
    assert note == f"layers kept in float: depthwise, grouped ({GROUPED_WHY})"
    warnings = [r.getMessage() for r in caplog.records if "kept in float" in r.getMessage()]
    assert warnings == [f"node 0:ptq_dynamic: {note}"]
    x = conv_dm.test[:][0]
    assert relative_error(result.model(x), model(x)) < 2e-3


@pytest.mark.parametrize("conv, why", [
    (nn.Conv1d(1, 4, 3, padding="same"), "padding='same': the int8 conv kernel takes numeric padding only"),
    (nn.Conv1d(1, 4, 3, padding=1, padding_mode="circular"),
     "padding_mode='circular': the int8 conv kernel pads with zeros only"),
], ids=["same", "circular"])
def test_when_no_layer_can_run_in_int8_the_node_fails_naming_the_float_layers_and_why(conv, why, conv_dm, tmp_path):
    with pytest.raises(NodeError, match=rf"^node 0:ptq_dynamic: no layer can run in int8: layers kept in float: "
                                        rf"0 \({re.escape(why)}\)"):
        run({"kind": "ptq_dynamic", "allow_conv": True}, nn.Sequential(conv), conv_dm, tmp_path)
