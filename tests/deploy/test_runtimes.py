"""Each runtime: export, reload, agreement with the torch model, the metrics row's runtime fields."""
from __future__ import annotations

import json

import pytest
import torch

from fedcore_adapter.data import call_model, primary_output, split_batch
from fedcore_adapter.deploy import load_artifact
from fedcore_adapter.deploy.runner import relative_error
from fedcore_adapter.metrics import MB

from .conftest import FP32_TOLERANCE, INT8_TOLERANCE, TokenData, deploy_run, tiny_bert

ARTIFACTS = {"onnxruntime": ["model.onnx"], "openvino": ["model.xml", "model.bin"], "torch_compile": ["model.pt2"]}
RUNTIMES = [("onnxruntime", "dynamic"), ("onnxruntime", "static"), ("openvino", "static"),
            pytest.param("torch_compile", "static", marks=pytest.mark.slow)]


def _agreement(runner, model, loader) -> float:
    inputs, _ = split_batch(next(iter(loader)))
    with torch.inference_mode():
        return relative_error(call_model(runner, inputs), primary_output(call_model(model, inputs)))


@pytest.mark.parametrize("runtime, quantize", RUNTIMES)
def test_the_cnn_is_exported_quantized_reloaded_and_measured_in_its_runtime(tmp_path, cnn, runtime, quantize):
    model, dm = cnn
    result = deploy_run(tmp_path, model, dm, runtime=runtime, quantize=quantize, threads=1, calibration_batches=2)
    final = result.output_dir / "final"
    files = ARTIFACTS[runtime]
    assert all((final / f).is_file() for f in files)
    info = json.loads((final / "deploy.json").read_text())
    assert info["runtime"] == runtime and info["quantize"] == quantize and info["relative_error"] <= INT8_TOLERANCE

    reloaded = load_artifact(final / files[0])  # the artifact alone answers, as the torch model does
    assert _agreement(reloaded, model, dm.test_dataloader()) <= INT8_TOLERANCE

    base, row = result.metrics
    assert (base["runtime"], base["batch_shape"]) == ("torch", "64x1x40")
    assert (row["runtime"], row["threads"], row["batch_shape"]) == (runtime, 1, "64x1x40")
    assert row["size_mb"] == pytest.approx(sum((final / f).stat().st_size for f in files) / MB)
    assert row["size_mb"] < base["size_mb"] / 2  # int8 weights
    assert row["params"] == base["params"] and row["macs"] == base["macs"]
    assert abs(row["accuracy"] - base["accuracy"]) <= 0.03  # quality measured through the runtime
    assert row["dtype"] == "int8+float32"


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_fp32_in_the_runtime_matches_the_torch_model(tmp_path, cnn, runtime):
    model, dm = cnn
    result = deploy_run(tmp_path, model, dm, runtime=runtime, quantize="none")
    assert _agreement(result.model, model, dm.test_dataloader()) <= FP32_TOLERANCE
    assert result.metrics[-1]["dtype"] == "float32"
    assert result.metrics[-1]["accuracy"] == pytest.approx(result.metrics[0]["accuracy"])


@pytest.mark.parametrize("runtime, quantize", [("onnxruntime", "dynamic"), ("onnxruntime", "static"),
                                               ("openvino", "static")])
def test_a_tiny_bert_takes_its_dict_inputs_in_every_runtime(tmp_path, runtime, quantize):
    model, dm = tiny_bert(), TokenData()
    result = deploy_run(tmp_path, model, dm, runtime=runtime, quantize=quantize, calibration_batches=4)
    runner = result.model
    assert runner.signature.names == ("input_ids", "attention_mask", "token_type_ids")
    batch = next(iter(dm.test_dataloader()))
    short = {k: v[:3, :11] for k, v in batch.items()}  # other batch and sequence sizes: dynamic dims
    with torch.inference_mode():
        assert relative_error(runner(**short), model(**short).last_hidden_state) <= INT8_TOLERANCE
    row = result.metrics[-1]
    assert (row["runtime"], row["batch_shape"], row["accuracy"]) == (runtime, "8x16", None)


@pytest.mark.slow
def test_torch_compile_runs_the_int8_graph_in_fused_onednn_kernels(tmp_path):
    from torch._inductor.utils import run_and_get_code

    model, dm = tiny_bert(), TokenData()
    runner = deploy_run(tmp_path, model, dm, runtime="torch_compile", calibration_batches=2).model
    batch = next(iter(dm.test_dataloader()))
    with torch.inference_mode():
        output, code = run_and_get_code(runner, **batch)
        expected = model(**batch).last_hidden_state
    assert runner.fused  # compiled with inductor's freezing: weights constant, quantize/dequantize fused
    assert any("qlinear_pointwise" in c for c in code)  # the int8 GEMMs run in oneDNN, not as float matmuls
    assert relative_error(output, expected) <= INT8_TOLERANCE


@pytest.mark.slow
def test_torch_compile_takes_a_bert_whose_pooler_the_hidden_states_leave_unused(tmp_path):
    """all-MiniLM-L6-v2 loads with a pooler (Linear -> Tanh) that its hidden states do not use: torchao's x86
    quantizer failed on that dead pattern ("list index out of range"), so the export drops dead code first."""
    model, dm = tiny_bert(pooler=True), TokenData()
    runner = deploy_run(tmp_path, model, dm, runtime="torch_compile", calibration_batches=2).model
    batch = next(iter(dm.test_dataloader()))
    with torch.inference_mode():
        assert relative_error(runner(**batch), model(**batch).last_hidden_state) <= INT8_TOLERANCE
    assert runner.fused


@pytest.mark.slow
def test_torch_compile_runs_the_cnn_in_fused_int8_convolutions(tmp_path, cnn):
    """The CNN's Conv1d layers reach inductor as the Conv2d they equal: torch 2.13's int8 Conv1d, frozen, failed
    where its output is reshaped (the flatten before the classifier), and the runner fell back to float kernels."""
    from torch._inductor.utils import run_and_get_code

    model, dm = cnn
    result = deploy_run(tmp_path, model, dm, runtime="torch_compile", calibration_batches=2)
    assert result.model.fused  # as measured in the node
    runner = load_artifact(result.output_dir / "final" / "model.pt2")  # compiled anew
    with torch.inference_mode():
        for x, _ in dm.test_dataloader():  # 64 each, then 40: a second shape compiled static too (recompiled with
            assert relative_error(runner(x), model(x)) <= INT8_TOLERANCE  # dynamic shapes, the one-channel
    assert runner.fused                                                   # input failed its stride check)
    with torch.inference_mode():
        _, code = run_and_get_code(runner, x)
    assert any("qconv_pointwise" in c for c in code)  # int8 convolutions in oneDNN


@pytest.mark.slow
def test_an_int8_torch_compile_artifact_loads_in_a_process_that_never_quantized(tmp_path, cnn):
    """The archive's quantize / dequantize ops are registered by PT2E's quantizing; the inference command's
    process only loads it (it failed there: "We failed to resolve torch.ops.quantized_decomposed...")."""
    import subprocess
    import sys

    model, dm = cnn
    final = deploy_run(tmp_path / "run", model, dm, runtime="torch_compile", calibration_batches=2).output_dir
    x = next(iter(dm.test_dataloader()))[0][:4]
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch; from fedcore_adapter.deploy import load_artifact; "
              "torch.save(load_artifact(sys.argv[1])(torch.load(sys.argv[2])), sys.argv[3])")
    subprocess.run([sys.executable, "-c", script, str(final / "final" / "model.pt2"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, capture_output=True, timeout=600)
    with torch.inference_mode():
        assert relative_error(torch.load(tmp_path / "y.pt"), model(x)) <= INT8_TOLERANCE


class _Conv1dKinds(torch.nn.Module):
    """Conv1d with bias, dilation, ``padding="same"``, groups; a batch norm and ReLU after one, an add after both."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv1d(4, 8, 3, padding="same", dilation=2)
        self.b = torch.nn.Conv1d(4, 8, 3, stride=2, padding=1, groups=4, bias=False)
        self.norm = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8 * 10, 3)

    def forward(self, x):
        y = torch.relu(self.norm(self.a(x)))[..., ::2] + self.b(x)
        return self.head(y.flatten(1))


def test_conv1d_layers_are_exported_as_the_conv2d_they_equal():
    from fedcore_adapter.deploy.torch_compile import _conv1d_as_conv2d

    torch.manual_seed(0)
    model = _Conv1dKinds().eval()
    model.norm.running_mean.uniform_(-1, 1)
    model.norm.running_var.uniform_(0.5, 2)
    dynamic = ({0: torch.export.Dim.AUTO},)
    graph = torch.export.export(model, (torch.randn(6, 4, 20),), dynamic_shapes=dynamic).module()
    assert _conv1d_as_conv2d(graph)
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    aten = torch.ops.aten
    assert aten.conv1d.default not in targets and aten.conv1d.padding not in targets
    assert targets.count(aten.conv2d.default) + targets.count(aten.conv2d.padding) == 2
    assert targets.count(aten.unsqueeze.default) == 1  # both convolutions read one 4D copy of the input
    assert targets.index(aten.relu.default) < targets.index(aten.squeeze.dim)  # batch norm, ReLU stay 4D
    for batch in (6, 1, 9):
        x = torch.randn(batch, 4, 20)
        with torch.no_grad():
            torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_node_checkpoint_keeps_the_float_model_it_exported(tmp_path, cnn):
    from fedcore_adapter.checkpoint import load_model
    from fedcore_adapter.zoo.models import MNIST1DCNN

    model, dm = cnn
    result = deploy_run(tmp_path, model, dm, runtime="onnxruntime")
    restored = load_model(result.output_dir / "final", MNIST1DCNN())
    x = next(iter(dm.test_dataloader()))[0]
    assert torch.equal(restored(x), model(x))


def test_the_agreement_check_reads_the_real_tokens_only():
    from fedcore_adapter.deploy.node import _real_tokens

    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(_real_tokens(hidden, {"attention_mask": mask}), hidden[mask.bool()])  # 3 tokens x 2
    logits = torch.randn(2, 5)
    assert _real_tokens(logits, {"attention_mask": mask}) is logits  # not token outputs: all of it
    assert _real_tokens(hidden, hidden) is hidden  # no mask


def test_an_openvino_model_the_cpus_default_precision_cannot_compile_is_compiled_at_f32(tmp_path, monkeypatch,
                                                                                       caplog):
    """On CPUs with bf16 the plugin runs an int8 model's float parts in bf16, and lacks a kernel for some layers
    ("No suitable implementations", the MNIST-1D CNN on an AMD EPYC): the runner compiles it at f32, and says so."""
    import openvino as ov

    from fedcore_adapter.deploy.openvino import ARTIFACT, build, load
    from fedcore_adapter.deploy.signature import Signature

    model = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten()).eval()
    x = torch.randn(2, 1, 8)
    build(model, Signature.of(x), (x,), tmp_path, quantize="none", calibration=[], model_type="auto")
    compile_model = ov.Core.compile_model

    def bf16_fails(self, path, device, options):
        if "INFERENCE_PRECISION_HINT" not in options:
            raise RuntimeError("Check '!implementations.empty()' failed: No suitable implementations.")
        return compile_model(self, path, device, options)

    monkeypatch.setattr(ov.Core, "compile_model", bf16_fails)
    with caplog.at_level("WARNING", logger="fedcore_adapter"):
        runner = load(tmp_path / ARTIFACT, threads=1, weight_dtype="int8")
    assert runner.precision == "f32" and "compiled at f32" in caplog.text
    assert relative_error(call_model(runner, (x,)), model(x)) < FP32_TOLERANCE


def _package_code(package) -> str:
    import zipfile

    with zipfile.ZipFile(package) as z:
        return "".join(z.read(n).decode() for n in z.namelist() if n.endswith(".cpp"))


@pytest.mark.slow
def test_torch_compile_aot_packages_the_int8_cnn_and_its_runner_loads_it_without_compiling(tmp_path, cnn):
    """``compile: aot``: the node compiles the archive with AOTInductor for its threads and its batch's shape
    (frozen: int8 oneDNN convolutions), measures the package, and a later load of the archive runs that package
    without compiling; another shape gets its own package (static: AOTInductor's int8 code with dynamic dims
    answered wrongly at other shapes)."""
    from fedcore_adapter.deploy import torch_compile

    model, dm = cnn
    result = deploy_run(tmp_path, model, dm, runtime="torch_compile", compile="aot", threads=1,
                        calibration_batches=2)
    final = result.output_dir / "final"
    package = final / "model.aoti" / "threads_1" / "64x1x40.pt2"
    info = json.loads((final / "deploy.json").read_text())
    assert info["compile"] == "aot" and info["files"] == ["model.pt2", "model.aoti/threads_1/64x1x40.pt2"]
    assert "qconv_pointwise" in _package_code(package)  # int8 convolutions, not float ones with fake quantization
    row = result.metrics[-1]
    assert (row["runtime"], row["batch_shape"]) == ("torch_compile", "64x1x40")
    assert row["size_mb"] == pytest.approx(package.stat().st_size / MB)
    assert abs(row["accuracy"] - result.metrics[0]["accuracy"]) <= 0.03

    compiled = []
    real = torch_compile.aot_package
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch_compile, "aot_package", lambda *a: compiled.append(a[2][0].shape) or real(*a))
        runner = load_artifact(final)
        x = next(iter(dm.test_dataloader()))[0]
        with torch.inference_mode():
            for n in (64, 7, 64):
                assert relative_error(runner(x[:n]), model(x[:n])) <= INT8_TOLERANCE
    assert isinstance(runner, torch_compile.PackagedRunner) and runner.packages["64x1x40"] == package
    assert compiled == [torch.Size([7, 1, 40])]  # the node's package loaded; 7 compiled once, outside the results
    assert final not in runner.packages["7x1x40"].parents
    assert sorted(p.name for p in (final / "model.aoti" / "threads_1").iterdir()) == ["64x1x40.pt2"]


@pytest.mark.slow
def test_an_aot_runner_asked_for_other_threads_compiles_its_own_package_outside_the_results(tmp_path, cnn):
    from fedcore_adapter.deploy import torch_compile

    model, dm = cnn
    final = deploy_run(tmp_path, model, dm, runtime="torch_compile", compile="aot", threads=1,
                       calibration_batches=2).output_dir / "final"
    runner = load_artifact(final / "model.pt2", threads=2)
    x = next(iter(dm.test_dataloader()))[0]
    with torch.inference_mode():
        assert relative_error(runner(x), model(x)) <= INT8_TOLERANCE
    assert isinstance(runner, torch_compile.PackagedRunner) and runner.threads == 2
    package = runner.packages["64x1x40"]
    assert final not in package.parents and not (final / "model.aoti" / "threads_2").exists()
    assert "omp parallel" in _package_code(package) and "omp parallel" not in \
        _package_code(final / "model.aoti" / "threads_1" / "64x1x40.pt2")  # the thread count is compiled in
