"""``ptq_static`` and ``qat``: calibrated or trained ranges, fused int8 graphs, eager fallback, LSQ scales; the
convolutions torch's int8 convolution cannot take stay float and the metrics row says so."""
import logging

import pytest
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
from torch import nn

from fedcore_adapter import load_model
from fedcore_adapter.errors import NodeError
from fedcore_adapter.nodes.quantization.ao import calibrate, prepare_model
from fedcore_adapter.nodes.quantization.backends import PercentileObserver
from fedcore_adapter.nodes.quantization.config import QATConfig
from fedcore_adapter.nodes.quantization.static import static_plan
from tests.nodes.test_quantization import BranchyNet, TinyConvNet, run


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().pow(2).sum() / b.detach().pow(2).sum())


def test_fx_mode_fuses_conv_batchnorm_relu_into_int8_kernels(conv_model, conv_dm, tmp_path):
    quantized = run({"kind": "ptq_static"}, conv_model, conv_dm, tmp_path).model
    assert isinstance(quantized, torch.fx.GraphModule)
    fused = [m for m in quantized.modules() if isinstance(m, nniq.ConvReLU1d)]
    assert len(fused) == 2 and not any(isinstance(m, nn.BatchNorm1d) for m in quantized.modules())
    assert isinstance(quantized.classifier.get_submodule("1"), nniq.LinearReLU)


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "histogram", "percentile"])
def test_every_observer_calibrates_a_model_close_to_float(observer, conv_model, conv_dm, tmp_path):
    quantized = run({"kind": "ptq_static", "observer": observer}, conv_model, conv_dm, tmp_path).model
    x = conv_dm.test[:][0]
    assert relative_error(quantized(x), conv_model(x).detach()) < 0.02


def test_percentile_observer_clips_rare_outliers_that_min_max_keeps():
    x = torch.randn(10_000)
    x[0] = 1_000.0
    observer = PercentileObserver(percentile=99.9, dtype=torch.quint8)
    observer(x)
    assert observer.max_val < 5 and observer.min_val > -5
    scale, _ = observer.calculate_qparams()
    assert float(scale) < 10 / 255


def test_an_untraceable_model_is_quantized_layer_by_layer_and_reloads(conv_dm, tmp_path):
    model = BranchyNet().eval()
    result = run({"kind": "ptq_static"}, model, conv_dm, tmp_path)
    wrapped = result.model.features[0]
    assert isinstance(wrapped.quant, nnq.Quantize) and isinstance(wrapped.module, nnq.Conv1d)
    assert isinstance(result.model.features[1], nn.Identity)  # BatchNorm folded before wrapping
    x = conv_dm.test[:][0]
    assert relative_error(result.model(x), model(x).detach()) < 0.02
    assert torch.equal(load_model(result.output_dir, BranchyNet(seed=4))(x), result.model(x))


def test_forcing_fx_on_an_untraceable_model_says_so_in_one_line(conv_dm, tmp_path):
    with pytest.raises(NodeError,
                       match=r"graph_mode='fx' but torch.fx cannot trace the model \(.*\); use graph_mode=eager"):
        run({"kind": "ptq_static", "graph_mode": "fx"}, BranchyNet(), conv_dm, tmp_path)


def test_qat_trains_fake_quantized_weights_then_converts_to_int8(conv_model, conv_dm, tmp_path):
    result = run({"kind": "qat", "epochs": 2, "learning_rate": 1e-3}, conv_model, conv_dm, tmp_path)
    assert any(isinstance(m, nniq.ConvReLU1d) for m in result.model.modules())
    x = conv_dm.test[:][0]
    float_out = conv_model(x).detach()
    assert 0 < relative_error(result.model(x), float_out) < 0.2  # trained: close, but not the float model


def test_learnable_scales_are_calibrated_then_trained_with_weight_zero_points_fixed(conv_model, conv_dm):
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    from fedcore_adapter.nodes.quantization.qat import _start_learning_scales
    from fedcore_adapter.nodes.quantization.selective import quantizable_layers

    import copy

    model = copy.deepcopy(conv_model)
    x = conv_dm.train[:16][0]
    plan = static_plan(QATConfig(learnable_scales=True), quantizable_layers(model, ["linear", "conv"]), set(), "fx",
                       x, model, method="qat")
    plan["learnable"] = True
    prepared = prepare_model(model, plan)
    calibrate(prepared, [x])
    fake_quants = [m for m in prepared.modules() if isinstance(m, _LearnableFakeQuantize)]
    assert fake_quants and all(float(m.scale.detach().min()) != 1.0 for m in fake_quants)  # calibrated, not the init
    _start_learning_scales(prepared, 0.01)
    assert all(m.scale.requires_grad for m in fake_quants)
    weights = [m for m in fake_quants if m.qscheme == torch.per_channel_symmetric]
    assert weights and not any(m.zero_point.requires_grad for m in weights)
    from fedcore_adapter.schema import TrainParams
    from fedcore_adapter.trainer import make_optimizer

    groups = make_optimizer(TrainParams(learning_rate=1e-3), prepared).param_groups
    scale_ids = {id(m.scale) for m in fake_quants}
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-5)]  # scales learn 100x slower than weights
    assert {id(p) for p in groups[1]["params"]} >= scale_ids and not scale_ids & {id(p) for p in groups[0]["params"]}


def test_qat_with_learnable_scales_reloads_identically(conv_model, conv_dm, tmp_path):
    result = run({"kind": "qat", "epochs": 1, "learnable_scales": True}, conv_model, conv_dm, tmp_path)
    x = conv_dm.test[:][0]
    assert torch.equal(load_model(result.output_dir, TinyConvNet(seed=2))(x), result.model(x))


def test_qat_on_an_untraceable_model_trains_layer_by_layer_fake_quant(conv_dm, tmp_path):
    result = run({"kind": "qat", "epochs": 1}, BranchyNet().eval(), conv_dm, tmp_path)
    assert isinstance(result.model.classifier[1].module, nnq.Linear)
    x = conv_dm.test[:][0]
    assert torch.equal(load_model(result.output_dir, BranchyNet(seed=4))(x), result.model(x))


class CircularPadNet(nn.Module):
    """A conv, a circular-padding conv (torch's int8 convolution pads with zeros or reflect only), a Linear."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.plain = nn.Conv1d(1, 8, 3, padding=1)
        self.circular = nn.Conv1d(8, 8, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(8 * 16, 3)

    def forward(self, x):
        return self.fc(self.circular(torch.relu(self.plain(x))).flatten(1))


CIRCULAR_WHY = "padding_mode='circular': torch's int8 convolution pads with zeros or reflect only"


def runs_int8(module: nn.Module) -> bool:
    return any(type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))
               for m in module.modules())


@pytest.mark.parametrize("node", [{"kind": "ptq_static"}, {"kind": "ptq_static", "graph_mode": "eager"},
                                  {"kind": "qat", "epochs": 1}], ids=["static-fx", "static-eager", "qat"])
def test_a_conv_torchs_int8_convolution_cannot_take_stays_float_and_the_row_and_one_warning_say_why(
        node, conv_dm, tmp_path, caplog):
    model = CircularPadNet().eval()
    with caplog.at_level(logging.WARNING, logger="fedcore_adapter"):
        result = run(node, model, conv_dm, tmp_path)
    assert type(result.model.circular) is nn.Conv1d and result.model.circular.weight.dtype == torch.float32
    assert runs_int8(result.model.plain) and runs_int8(result.model.fc)
    note = result.metrics[1]["note"]
    assert note == f"layers kept in float: circular ({CIRCULAR_WHY})"
    warnings = [r.getMessage() for r in caplog.records if "kept in float" in r.getMessage()]
    assert warnings == [f"node 0:{node['kind']}: {note}"]
    x = conv_dm.test[:][0]
    assert relative_error(result.model(x), model(x).detach()) < 0.2
    assert torch.equal(load_model(result.output_dir, CircularPadNet(seed=4))(x), result.model(x))


def test_a_skip_pattern_naming_a_layer_kept_float_anyway_is_accepted(conv_dm, tmp_path):
    result = run({"kind": "ptq_static", "skip": ["circular"]}, CircularPadNet().eval(), conv_dm, tmp_path)
    assert type(result.model.circular) is nn.Conv1d and runs_int8(result.model.fc)


def test_when_no_layer_can_run_in_int8_static_fails_naming_the_float_layers_and_why(conv_dm, tmp_path):
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding="same"))
    with pytest.raises(NodeError, match=r"^node 0:ptq_static: no layer can run in int8: layers kept in float: 0 "
                                        r"\(padding='same': torch's int8 convolution takes numeric padding only\)"):
        run({"kind": "ptq_static"}, model, conv_dm, tmp_path)
