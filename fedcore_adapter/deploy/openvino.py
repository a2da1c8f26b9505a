"""OpenVINO: ``openvino.convert_model`` from the torch model, int8 through NNCF post-training quantization."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..errors import error_line
from .runner import Runner, numpy_inputs
from .signature import Positional, Signature

log = logging.getLogger("fedcore_adapter")

ARTIFACT = "model.xml"


def convert(model: nn.Module, signature: Signature, example: Sequence[torch.Tensor]):
    """The OpenVINO model of ``model`` (inputs named as the signature says, dynamic shapes)."""
    import openvino as ov  # lazy: openvino belongs to the deploy extra; runs that do not deploy to it never import it

    with torch.no_grad():
        ov_model = ov.convert_model(Positional(model, signature).eval(), example_input=tuple(example))
    for port, name in zip(ov_model.inputs, signature.names):
        port.get_tensor().set_names({name})
    ov_model.outputs[0].get_tensor().set_names({"output"})
    return ov_model


def export_leaf(module: nn.Module, args: tuple, folder: Path, opset: int) -> None:
    convert(module, Signature.of(args if len(args) > 1 else args[0]), args)


def is_transformer(model: nn.Module) -> bool:
    """Models with attention get NNCF's transformer preset."""
    return any("attention" in type(m).__name__.lower() or isinstance(m, nn.MultiheadAttention)
               for m in model.modules())


def build(model: nn.Module, signature: Signature, example: Sequence[torch.Tensor], folder: Path, *, quantize: str,
          calibration: Iterable[Sequence[torch.Tensor]], model_type: str) -> list[Path]:
    """Write ``model.xml`` + ``model.bin`` (NNCF int8 unless ``quantize=none``); returns the files."""
    import openvino as ov  # lazy: the deploy extra, as in convert

    ov_model = convert(model, signature, example)
    if quantize != "none":
        import nncf  # lazy: the deploy extra, only to quantize

        batches = [dict(zip(signature.names, numpy_inputs(t))) for t in calibration]
        transformer = model_type == "transformer" or (model_type == "auto" and is_transformer(model))
        ov_model = nncf.quantize(ov_model, nncf.Dataset(batches), subset_size=max(len(batches), 1),
                                 model_type=nncf.ModelType.TRANSFORMER if transformer else None)
    out = folder / ARTIFACT
    ov.save_model(ov_model, str(out), compress_to_fp16=False)
    return [out, out.with_suffix(".bin")]


class OpenVinoRunner(Runner):
    runtime = "openvino"

    def __init__(self, path: Path, threads: Optional[int] = None, reference: Optional[nn.Module] = None,
                 weight_dtype: str = "int8"):
        import openvino as ov  # lazy: the deploy extra, as in convert

        threads = threads or torch.get_num_threads()
        core = ov.Core()
        options = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if weight_dtype == "float32":  # fp32 stays fp32 (the CPU plugin's default is bf16 where the CPU has it)
            options["INFERENCE_PRECISION_HINT"] = "f32"
        try:
            compiled = core.compile_model(str(path), "CPU", options)
        except RuntimeError as err:
            if "INFERENCE_PRECISION_HINT" in options:
                raise
            # On CPUs with bf16 (AMD Zen 4, Intel AMX) the plugin runs an int8 model's float parts in bf16 by
            # default, and has no bf16 kernel for some layers of it ("No suitable implementations"): f32 then.
            log.warning("openvino: %s does not compile at the CPU's default inference precision (%s); compiled "
                        "at f32", Path(path).name, error_line(err, limit=160))
            options["INFERENCE_PRECISION_HINT"] = "f32"
            compiled = core.compile_model(str(path), "CPU", options)
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # f32, bf16...
        self.request = compiled.create_infer_request()
        names = tuple(p.get_any_name() for p in compiled.inputs)
        keyword = names != tuple(f"input_{i}" for i in range(len(names)))
        super().__init__(path, [path, Path(path).with_suffix(".bin")], Signature(names, keyword), threads,
                         weight_dtype, reference)

    def run(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        self.request.infer(dict(zip(self.signature.names, numpy_inputs(tensors))))
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


def load(path: Path, threads: Optional[int] = None, reference: Optional[nn.Module] = None,
         weight_dtype: str = "int8") -> OpenVinoRunner:
    return OpenVinoRunner(Path(path), threads, reference, weight_dtype)
