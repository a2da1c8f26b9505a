"""Exported artifacts as inputs: the FedCore adapter's eval_computational_metrics and the inference command."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from fedcore_adapter.deploy import load_artifact
from fedcore_adapter.errors import ConfigError

from tests.conftest import TinyDataModule, tiny_mlp

from .conftest import FP32_TOLERANCE, deploy_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny MLP exported as fp32 ONNX and as OpenVINO int8."""
    root = tmp_path_factory.mktemp("exported")
    onnx = deploy_run(root / "ort", tiny_mlp(), TinyDataModule(), runtime="onnxruntime", quantize="none")
    ov = deploy_run(root / "ov", tiny_mlp(), TinyDataModule(), runtime="openvino", calibration_batches=2)
    return onnx.output_dir / "final", ov.output_dir / "final"


@pytest.mark.parametrize("which, name", [(0, "model.onnx"), (1, "model.xml")])
def test_eval_computational_metrics_measures_an_artifact_in_its_runtime(tmp_path, exported, which, name):
    from fedcore_adapter.api import eval_computational_metrics

    folder = exported[which]
    result = eval_computational_metrics(str(folder / name), TinyDataModule().test_dataloader(), tmp_path / "c.txt",
                                        id="a", num_threads=1, repeats=3)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model."))
    assert result["model_size"] == pytest.approx(size / 2**20)
    assert result["latency"] > 0 and result["throughput"] > 0
    assert (tmp_path / "c.txt").read_text().startswith("#a latency: ")


def test_a_deploy_node_folder_loads_as_its_artifact(exported):
    runner = load_artifact(exported[1])
    assert runner.runtime == "openvino" and runner.weight_dtype == "int8+float32"


def test_the_inference_command_scores_with_an_artifact(tmp_path, exported):
    from fedcore_adapter.entrypoints.inference import run_inference

    from tests.test_entrypoints import TINY, compose

    cfg = compose("inference", *TINY, f"inference_model={exported[0] / 'model.onnx'}",
                  f"inference.output={tmp_path}", "n_batches_computational=1")
    [path] = run_inference(cfg)
    frame = pd.read_csv(path)
    x, y = TinyDataModule().test[:]
    torch.manual_seed(0)
    expected = tiny_mlp()(x).detach()
    assert list(frame.columns) == ["target", "score_0000", "score_0001", "score_0002"]
    assert torch.allclose(torch.tensor(frame.filter(like="score_").to_numpy(), dtype=torch.float32), expected,
                          atol=FP32_TOLERANCE)
    assert frame["target"].tolist() == y.tolist()
    assert (tmp_path / "computational.txt").read_text().startswith("# latency: ")


def test_a_path_that_is_no_artifact_is_one_line(tmp_path):
    (tmp_path / "weights.txt").write_text("")
    with pytest.raises(ConfigError, match=r"weights.txt: not an exported model; expected a path ending in "
                                          r"\.onnx, \.xml, \.pt2 \(or the folder of a deploy node\)$"):
        load_artifact(tmp_path / "weights.txt")


def test_the_comparison_shows_one_chain_on_several_runtimes_side_by_side(tmp_path):
    from fedcore_adapter.pipeline import run_setup
    from fedcore_adapter.report import comparison_rows, runs_from_folders

    for runtime in ("onnxruntime", "openvino"):
        setup = {"name": f"MLP_{runtime}", "common": {"latency_warmup": 1, "latency_repeats": 2},
                 "nodes": [{"kind": "training", "epochs": 1, "progress": False},
                           {"kind": "deploy", "runtime": runtime, "threads": 1, "calibration_batches": 2}]}
        run_setup(setup, tiny_mlp(), TinyDataModule(), output_dir=tmp_path)
    rows = comparison_rows(runs_from_folders([tmp_path]))
    assert [(r["setup"], r["chain"], r["runtime"], r["threads"], r["batch_shape"]) for r in rows] == [
        ("input", "", "torch", torch.get_num_threads(), "16x8"),
        ("MLP_onnxruntime", "training -> deploy", "onnxruntime", 1, "16x8"),
        ("MLP_openvino", "training -> deploy", "openvino", 1, "16x8")]
