"""``ptq_dynamic``: int8 Linear (and Conv, Embedding on request) with activations quantized on the fly."""
import pytest
import torch
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig

from fedcore_adapter import load_model, measure
from fedcore_adapter.nodes.quantization.backends import has_vnni, supported_engines
from fedcore_adapter.nodes.quantization.conv import Int8Conv
from fedcore_adapter.nodes.quantization.modules import DynamicConv, DynamicLinear, SmoothDynamicLinear
from tests.conftest import TinyEncoder, TokenDataModule, tiny_mlp
from tests.nodes.test_quantization import run


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().pow(2).sum() / b.detach().pow(2).sum())


def test_linear_layers_become_per_channel_int8_and_stay_close_to_float(dm, tmp_path):
    model = tiny_mlp()
    quantized = run({"kind": "ptq_dynamic"}, model, dm, tmp_path).model
    assert [type(m) for m in quantized if not isinstance(m, nn.ReLU)] == [DynamicLinear, DynamicLinear]
    assert quantized[0].weight().qscheme() == torch.per_channel_affine
    x = dm.test[:][0]
    assert relative_error(quantized(x), model(x)) < 1e-3


def test_per_channel_false_gives_one_weight_scale_per_layer(dm, tmp_path):
    quantized = run({"kind": "ptq_dynamic", "per_channel": False}, tiny_mlp(), dm, tmp_path).model
    assert quantized[0].weight().qscheme() == torch.per_tensor_affine


@pytest.mark.skipif(not has_vnni(), reason="8-bit activations are only used on CPUs with VNNI")
def test_eight_bit_activations_on_vnni_cpus_round_less_than_torch_aos_seven_bits():
    torch.manual_seed(0)
    layer = nn.Linear(256, 64)
    layer.qconfig = per_channel_dynamic_qconfig
    quantized = DynamicLinear.from_float(layer)
    x = torch.randn(512, 256)
    full = relative_error(quantized(x), layer(x))
    quantized.activation_range = "reduced"
    reduced = relative_error(quantized(x), layer(x))
    assert full < 0.6 * reduced


@pytest.mark.parametrize("cls", [Int8Conv, DynamicConv], ids=["int8_conv", "im2col (older checkpoints)"])
def test_dynamic_conv_outputs_are_not_clipped_to_the_input_range(cls):
    """torch.ao's dynamic conv re-quantizes outputs with the input's range; ours must not."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, stride=2)
    with torch.no_grad():
        conv.weight.mul_(10)  # outputs ~6x larger than inputs
    conv.qconfig = per_channel_dynamic_qconfig
    x = torch.randn(4, 8, 10, 10)
    y, yq = conv(x), cls.from_conv(conv)(x)
    assert y.abs().max() > 3 * x.abs().max()
    assert yq.shape == y.shape
    assert relative_error(yq, y) < 1e-3


def test_allow_conv_folds_batchnorm_and_quantizes_convolutions(conv_model, conv_dm, tmp_path):
    quantized = run({"kind": "ptq_dynamic", "allow_conv": True}, conv_model, conv_dm, tmp_path).model
    assert isinstance(quantized.features[0], Int8Conv) and isinstance(quantized.features[3], Int8Conv)
    assert isinstance(quantized.features[1], nn.Identity)  # BatchNorm folded into the conv
    x = conv_dm.test[:][0]
    assert relative_error(quantized(x), conv_model(x)) < 2e-3


def test_without_allow_conv_convolutions_and_batchnorm_stay_float(conv_model, conv_dm, tmp_path):
    quantized = run({"kind": "ptq_dynamic"}, conv_model, conv_dm, tmp_path).model
    assert type(quantized.features[0]) is nn.Conv1d and type(quantized.features[1]) is nn.BatchNorm1d
    assert isinstance(quantized.classifier[1], DynamicLinear)


def test_allow_emb_stores_int8_rows_and_an_embedding_lookup_counts_no_macs(tmp_path):
    torch.manual_seed(0)
    model, dm = TinyEncoder().eval(), TokenDataModule()
    result = run({"kind": "ptq_dynamic", "allow_emb": True}, model, dm, tmp_path)
    assert result.model.emb.weight().dtype == torch.quint8
    batch = next(iter(dm.test_dataloader()))
    reloaded = load_model(result.output_dir, TinyEncoder())
    assert torch.equal(reloaded(**batch).last_hidden_state, result.model(**batch).last_hidden_state)
    rows = [measure(m, dm.test_dataloader(), device=torch.device("cpu"), repeats=1, warmup=0)
            for m in (model, result.model)]
    assert rows[1]["macs"] == rows[0]["macs"]


def outlier_data(n: int = 64) -> torch.Tensor:
    """Inputs with one channel 100x larger than the rest, as in transformer activations."""
    x = torch.randn(n, 64)
    x[:, 7] *= 100
    return x


class OutlierDataModule:
    def _loader(self):
        torch.manual_seed(1)
        return torch.utils.data.DataLoader(outlier_data(), batch_size=32)

    train_dataloader = val_dataloader = test_dataloader = _loader


def test_smoothquant_moves_activation_outliers_into_weights_and_cuts_the_error(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    dm = OutlierDataModule()
    plain = run({"kind": "ptq_dynamic"}, model, dm, tmp_path / "plain").model
    smooth_result = run({"kind": "ptq_dynamic", "smooth_alpha": 0.5, "smooth_min_gain": 1.0}, model, dm,
                        tmp_path / "smooth")
    smooth = smooth_result.model
    assert isinstance(smooth[0], SmoothDynamicLinear)
    assert smooth[0].input_scale[7] < 0.2 * smooth[0].input_scale.median()  # the outlier channel is divided down
    x = outlier_data()
    assert relative_error(smooth(x), model(x)) < 0.5 * relative_error(plain(x), model(x))
    reloaded = load_model(smooth_result.output_dir, nn.Sequential(nn.Linear(64, 64)))
    assert torch.equal(reloaded(x), smooth(x))


@pytest.mark.skipif("qnnpack" not in supported_engines(), reason="qnnpack kernels not built")
def test_a_model_packed_for_another_engine_reloads_with_that_engines_outputs(dm, tmp_path):
    result = run({"kind": "ptq_dynamic", "backend": "qnnpack"}, tiny_mlp(), dm, tmp_path)
    x = dm.test[:][0]
    assert torch.backends.quantized.engine != "qnnpack"
    assert torch.equal(load_model(result.output_dir, tiny_mlp(seed=3))(x), result.model(x))


def test_smoothquant_is_kept_only_where_it_cuts_the_layers_own_error(tmp_path):
    import json

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))  # tanh: no outliers reach layer 2
    result = run({"kind": "ptq_dynamic", "smooth_alpha": 0.5, "smooth_min_gain": 3.0}, model, OutlierDataModule(),
                 tmp_path)
    report = json.loads((result.output_dir / "final" / "smoothing.json").read_text())
    assert report["error_ratio"]["0"] >= 3 > report["error_ratio"]["2"]
    assert report["smoothed"] == ["0"]
    assert isinstance(result.model[0], SmoothDynamicLinear)
    assert type(result.model[2]) is DynamicLinear
