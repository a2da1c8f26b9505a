"""Quantized checkpoints: a JSON plan replayed after earlier structural records, and the export archive."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from fedcore_adapter import load_model, run_setup
from fedcore_adapter.data import has_quantized_weights, runtime_device
from fedcore_adapter.errors import NodeError
from fedcore_adapter.nodes.quantization.conv import Int8Conv
from fedcore_adapter.nodes.quantization.modules import DynamicLinear
from tests.conftest import TinyEncoder, TokenDataModule, tiny_setup
from tests.nodes.test_quantization import BranchyNet, TinyConvNet, run


def test_the_manifest_records_the_quantization_plan_as_json(conv_model, conv_dm, tmp_path):
    result = run({"kind": "ptq_static", "observer": "percentile"}, conv_model, conv_dm, tmp_path)
    record = json.loads((result.output_dir / "final" / "manifest.json").read_text())["transforms"][-1]
    assert record["transform"] == "quantize"
    plan = record["data"]
    assert (plan["method"], plan["graph"], plan["engine"], plan["observer"]) == ("static", "fx", "x86", "percentile")
    assert plan["inputs"] == [{"shape": [16, 1, 16], "dtype": "float32"}]
    assert set(plan["layers"]) == {"features.0", "features.3", "classifier.1", "classifier.3"}


def test_low_rank_factors_are_quantized_and_replayed_after_the_decomposition(conv_model, conv_dm, tmp_path):
    nodes = [{"kind": "low_rank", "spectrum_pruning_strategy": "rank", "rank": 2},
             {"kind": "ptq_dynamic", "allow_conv": True}]
    result = run_setup(tiny_setup(*nodes, measure=False), conv_model, conv_dm, output_dir=tmp_path)
    factors = result.model.classifier[1]
    assert isinstance(factors.first, DynamicLinear) and isinstance(factors.second, DynamicLinear)
    assert isinstance(result.model.features[3].first, Int8Conv)
    transforms = json.loads((result.output_dir / "final" / "manifest.json").read_text())["transforms"]
    assert [t["transform"] for t in transforms][-1] == "quantize" and len(transforms) >= 2
    x = conv_dm.test[:][0]
    assert torch.equal(load_model(result.output_dir, TinyConvNet(seed=3))(x), result.model(x))


def test_a_pruned_model_is_statically_quantized_with_its_smaller_channels(conv_model, conv_dm, tmp_path):
    nodes = [{"kind": "pruning", "pruning_ratio": 0.5}, {"kind": "ptq_static"}]
    result = run_setup(tiny_setup(*nodes, measure=False), conv_model, conv_dm, output_dir=tmp_path)
    conv = result.model.features.get_submodule("3")
    assert conv.weight().is_quantized and conv.weight().shape[0] < 64
    x = conv_dm.test[:][0]
    assert torch.equal(load_model(result.output_dir, TinyConvNet(seed=3))(x), result.model(x))


def test_every_quantized_form_is_detected_so_the_engine_runs_it_on_cpu(conv_dm, tmp_path):
    eager = run({"kind": "ptq_static"}, BranchyNet().eval(), conv_dm, tmp_path / "eager").model
    emb_only = run({"kind": "ptq_dynamic", "allow_emb": True, "skip": ["proj"]}, TinyEncoder(), TokenDataModule(),
                   tmp_path / "emb").model
    for model in (eager, emb_only):
        assert has_quantized_weights(model)
        assert runtime_device(model, torch.device("cuda")) == torch.device("cpu")
    assert not has_quantized_weights(TinyConvNet())


def graph_ops(program: torch.export.ExportedProgram) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}


EXPORT_CHECK = """
import sys, torch
program = torch.export.load(sys.argv[1])
x = torch.load(sys.argv[2])
torch.save(program.module()(x), sys.argv[3])
"""


def test_export_writes_a_torch_export_archive_that_runs_without_the_model_code(conv_model, conv_dm, tmp_path):
    result = run({"kind": "ptq_static", "export": True}, conv_model, conv_dm, tmp_path / "run")
    archive = result.output_dir / "final" / "model.pt2"
    x = conv_dm.test[:][0]
    torch.save(x, tmp_path / "x.pt")
    # a fresh interpreter that never imports this test module, fedcore_adapter or the model class
    subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(archive), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path, timeout=120)
    y = torch.load(tmp_path / "y.pt")
    expected = result.model(x)
    step = float(result.model.classifier.get_submodule("3").scale)  # one output quantization step
    assert (y - expected).abs().max() <= step + 1e-6
    weights = torch.export.load(archive).state_dict  # the graph itself is ~150 kB of JSON, whatever the model
    assert any(t.dtype == torch.int8 for t in weights.values())
    weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    float_bytes = sum(t.numel() * t.element_size() for t in conv_model.state_dict().values())
    assert weight_bytes < 0.35 * float_bytes
    ops = graph_ops(torch.export.load(archive))  # every layer an int8 x int8 -> int32 GEMM, none in float
    assert "aten._int_mm.default" in ops and not ops & {"aten.linear.default", "aten.conv1d.default"}


def test_a_model_torch_export_cannot_trace_is_one_line_naming_the_error_and_the_way_out(conv_dm, tmp_path):
    with pytest.raises(NodeError, match=r"^node 0:ptq_dynamic: export failed \(\w+: .+\); set export=false to keep the "
                                        r"int8 checkpoint only") as err:  # BranchyNet: control flow on a tensor's value
        run({"kind": "ptq_dynamic", "allow_conv": True, "export": True}, BranchyNet(), conv_dm, tmp_path)
    assert "\n" not in str(err.value)


def test_dynamic_export_matches_the_int8_model(conv_model, conv_dm, tmp_path):
    result = run({"kind": "ptq_dynamic", "allow_conv": True, "export": True}, conv_model, conv_dm, tmp_path)
    program = torch.export.load(result.output_dir / "final" / "model.pt2")
    x = conv_dm.test[:][0]
    torch.testing.assert_close(program.module()(x), result.model(x), atol=2e-2, rtol=1e-2)  # rare rounding flips
    assert isinstance(program, torch.export.ExportedProgram) and not any(
        isinstance(m, nn.Conv1d) for m in program.module().modules())
    assert "aten._int_mm.default" in graph_ops(program) and "aten.conv1d.default" not in graph_ops(program)


def test_an_encoder_with_int8_embeddings_and_smoothquant_exports_with_keyword_inputs(tmp_path):
    node = {"kind": "ptq_dynamic", "allow_emb": True, "smooth_alpha": 0.5, "smooth_min_gain": 1.0, "export": True}
    dm = TokenDataModule()
    result = run(node, TinyEncoder(), dm, tmp_path)
    program = torch.export.load(result.output_dir / "final" / "model.pt2")
    batch = next(iter(dm.test_dataloader()))
    out = program.module()(**batch)  # the encoder's SimpleNamespace comes back as a plain dict
    torch.testing.assert_close(out["last_hidden_state"], result.model(**batch).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert {t.dtype for t in program.state_dict.values()} >= {torch.int8, torch.uint8}  # Linear and embedding rows


class ResidualNet(nn.Module):
    """Residual add+ReLU, a gating product, a grouped conv and a concatenation: int8 ops between the layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv1d(1, 8, 3, padding=1), nn.Conv1d(8, 8, 3, padding=1)
        self.grouped = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 16 * 2, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h) + h)
        h = self.grouped(h) * h
        return self.fc(torch.cat([h, h], 1).flatten(1))


def test_static_export_covers_residual_adds_products_and_grouped_convs(conv_dm, tmp_path):
    result = run({"kind": "ptq_static", "export": True}, ResidualNet().eval(), conv_dm, tmp_path)
    assert "add_relu" in result.model.code and "quantized.mul" in result.model.code  # int8 ops between layers
    program = torch.export.load(result.output_dir / "final" / "model.pt2")
    x = conv_dm.test[:][0]
    step = float(result.model.fc.scale)
    assert (program.module()(x) - result.model(x)).abs().max() <= step + 1e-6


def test_static_export_covers_int8_activations_and_normalisations(conv_dm, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Hardswish(), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    result = run({"kind": "ptq_static", "export": True}, model, conv_dm, tmp_path)
    assert {m._get_name() for m in result.model.modules()} >= {"QuantizedHardswish", "QuantizedLayerNorm"}
    program = torch.export.load(result.output_dir / "final" / "model.pt2")
    x = conv_dm.test[:][0]
    assert (program.module()(x) - result.model(x)).abs().max() <= float(result.model.get_submodule("4").scale) + 1e-6
