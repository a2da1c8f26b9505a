"""ONNX Runtime: ``torch.onnx`` export, the runtime's own int8 (``quantize_dynamic`` / ``quantize_static``)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .runner import Runner, numpy_inputs
from .signature import Positional, Signature

ARTIFACT = "model.onnx"


def export_onnx(model: nn.Module, signature: Signature, tensors: Sequence[torch.Tensor], path: Path,
                opset: int) -> None:
    """Export ``model`` (called as its signature says) to ONNX with dynamic batch (and sequence) dims."""
    dims = signature.dynamic_dims(tensors)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about Python control flow on shapes
        torch.onnx.export(Positional(model, signature).eval(), tuple(tensors), str(path), dynamo=False,
                          input_names=list(signature.names), output_names=["output"], opset_version=opset,
                          dynamic_axes={n: {d: f"{n}_{d}" for d in ds} for n, ds in zip(signature.names, dims)}
                          | {"output": {0: "batch"}})


def export_leaf(module: nn.Module, args: tuple, folder: Path, opset: int) -> None:
    """Export one layer on its own (to find the layer an export failed at)."""
    export_onnx(module, Signature.of(args if len(args) > 1 else args[0]), args, folder / ".leaf.onnx", opset)


class _Calibration:
    """The ``CalibrationDataReader`` protocol over the calibration batches."""

    def __init__(self, signature: Signature, batches: Iterable[Sequence[torch.Tensor]]):
        self._feeds = iter([dict(zip(signature.names, numpy_inputs(t))) for t in batches])

    def get_next(self) -> Optional[dict]:
        return next(self._feeds, None)


def build(model: nn.Module, signature: Signature, example: Sequence[torch.Tensor], folder: Path, *, quantize: str,
          calibration: Iterable[Sequence[torch.Tensor]], per_channel: bool, opset: int) -> list[Path]:
    """Write ``model.onnx`` (int8 unless ``quantize=none``) into ``folder``; returns the files the runtime loads."""
    # lazy: onnxruntime belongs to the deploy extra; runs that do not deploy to it never import it
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = folder / ARTIFACT
    float_path = out if quantize == "none" else folder / ".float.onnx"
    export_onnx(model, signature, example, float_path, opset)
    if quantize != "none":
        prepared = folder / ".prepared.onnx"
        try:  # the runtime's recommended pre-processing (shape inference + graph optimisation)
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)  # (it writes into the cwd)
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the raw export
            prepared = float_path
        if quantize == "dynamic":
            quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
        else:
            quantize_static(str(prepared), str(out), _Calibration(signature, calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel)
        for tmp in {float_path, prepared}:
            tmp.unlink(missing_ok=True)
    return [out] + ([folder / f"{ARTIFACT}.data"] if (folder / f"{ARTIFACT}.data").exists() else [])


class OrtRunner(Runner):
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: Optional[int] = None, reference: Optional[nn.Module] = None,
                 weight_dtype: str = "int8"):
        import onnxruntime as ort  # lazy: the deploy extra, as in build

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        threads = threads or torch.get_num_threads()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = tuple(i.name for i in self.session.get_inputs())
        keyword = names != tuple(f"input_{i}" for i in range(len(names)))
        files = [path] + ([Path(f"{path}.data")] if Path(f"{path}.data").exists() else [])
        super().__init__(path, files, Signature(names, keyword), threads, weight_dtype, reference)

    def run(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        feed = dict(zip(self.signature.names, numpy_inputs(tensors)))
        return torch.from_numpy(self.session.run(None, feed)[0])


def load(path: Path, threads: Optional[int] = None, reference: Optional[nn.Module] = None,
         weight_dtype: str = "int8") -> OrtRunner:
    return OrtRunner(Path(path), threads, reference, weight_dtype)
