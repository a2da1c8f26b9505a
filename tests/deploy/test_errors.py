"""Refusals and failures of the deploy node: one line each, and the run keeps what came before."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from fedcore_adapter.errors import ConfigError, NodeError
from fedcore_adapter.schema import Setup

from tests.conftest import TinyDataModule, tiny_mlp

from .conftest import deploy_run


def _setup(*nodes: dict) -> dict:
    return {"name": "s", "nodes": list(nodes)}


@pytest.mark.parametrize("runtime, module, package", [("onnxruntime", "onnxruntime", "onnxruntime"),
                                                      ("openvino", "nncf", "nncf")])
def test_a_runtime_without_its_extra_is_refused_in_one_line_naming_the_extra(monkeypatch, runtime, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # as if the package were not installed
    with pytest.raises(ConfigError) as err:
        Setup.parse(_setup({"kind": "deploy", "runtime": runtime}))
    assert str(err.value) == (f"runtime {runtime} needs {package}, which is not installed; "
                              f"install the deploy extra: pip install 'fedcore-adapter[deploy]'")


def test_loading_an_artifact_without_the_extra_is_refused_the_same_way(tmp_path, monkeypatch):
    from fedcore_adapter.deploy import load_artifact

    (tmp_path / "model.xml").write_text("<net/>")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ConfigError, match=r"^runtime openvino needs openvino, which is not installed; install the "
                                          r"deploy extra: pip install 'fedcore-adapter\[deploy\]'$"):
        load_artifact(tmp_path / "model.xml")


@pytest.mark.parametrize("node, message", [
    ({"runtime": "openvino", "quantize": "dynamic"},
     r"^nodes\[0\] \(deploy\) = .*: runtime openvino quantizes with static, none "
     r"\(got quantize='dynamic'\)$"),
    ({"runtime": "tensorrt"}, r"^nodes\[0\] \(deploy\)\.runtime = 'tensorrt': Input should be 'onnxruntime', "
                              r"'openvino' or 'torch_compile'$"),
    ({"runtime": "onnxruntime", "compile": "aot"},
     r"^nodes\[0\] \(deploy\) = .*: compile=aot is a torch_compile option \(AOTInductor\); runtime onnxruntime "
     r"loads its artifact as it is \(got runtime='onnxruntime'\)$"),
    ({"runtime": "torch_compile", "compile": "ahead"},
     r"^nodes\[0\] \(deploy\)\.compile = 'ahead': Input should be 'jit' or 'aot'$"),
])
def test_bad_deploy_options_are_one_line(node, message):
    with pytest.raises(ConfigError, match=message):
        Setup.parse(_setup({"kind": "deploy", **node}))


def test_training_after_deploy_is_refused():
    with pytest.raises(ConfigError, match=r"nodes\[1\] \(training\) trains float weights but follows nodes\[0\] "
                                          r"\(deploy\)"):
        Setup.parse(_setup({"kind": "deploy"}, {"kind": "training"}))


def test_quantize_auto_is_the_runtimes_usual_int8():
    setup = Setup.parse(_setup({"kind": "deploy", "runtime": "onnxruntime"}))
    assert setup.nodes[0].quantize == "dynamic"
    setup = Setup.parse(_setup({"kind": "deploy", "runtime": "openvino"}))
    assert setup.nodes[0].quantize == "static"


class Histogram(nn.Module):
    """A layer built on ``torch.histc``: neither ONNX (opset 17) nor OpenVINO's converter has it."""

    def forward(self, x):
        return x + torch.histc(x, bins=4).sum()


class Gate(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot trace it."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def _model(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_mlp()
    return nn.Sequential(model[0], layer, model[1], model[2])


@pytest.mark.parametrize("runtime, layer, where", [
    ("onnxruntime", Histogram(), r"layer 1 \(Histogram\): UnsupportedOperatorError: Exporting the operator "
                                 r"'aten::histc' to ONNX opset version 17 is not supported"),
    ("openvino", Histogram(), r"layer 1 \(Histogram\): OpConversionFailure: "),
    ("torch_compile", Gate(), r"layer 1: .*data-dependent"),
])
def test_an_export_failure_is_one_line_naming_runtime_and_layer_and_keeps_the_run_before_it(
        tmp_path, runtime, layer, where):
    with pytest.raises(NodeError, match=rf"^node 0:deploy: {runtime} export failed at {where}") as err:
        deploy_run(tmp_path, _model(layer), TinyDataModule(), runtime=runtime, quantize="none")
    assert "\n" not in str(err.value)
    [partial] = tmp_path.glob("*.partial")  # beside it: the placement lock file
    run = json.loads((partial / "run.json").read_text())
    assert run["status"] == "failed" and run["completed_nodes"] == 0
    assert (partial / "nodes" / "0_input" / "state.pt").is_file()  # the measured input model is kept
    assert not any(p.name.endswith(".work") for p in (partial / "nodes").iterdir())  # no half-written artifact
    assert len(json.loads((partial / "metrics.json").read_text())) == 1


def test_a_torch_int8_model_is_refused_by_deploy(tmp_path):
    from fedcore_adapter.pipeline import run_setup

    setup = {"name": "q", "common": {"latency_repeats": 1, "latency_warmup": 0},
             "nodes": [{"kind": "ptq_dynamic"}, {"kind": "deploy"}]}
    with pytest.raises(NodeError, match=r"node 1:deploy: onnxruntime takes a float model and quantizes it with its "
                                        r"own quantizer; remove the torch int8 node before deploy"):
        run_setup(setup, tiny_mlp(), TinyDataModule(), output_dir=tmp_path)
