"""Config of the ``deploy`` node: which runtime, how it quantizes, how it is measured."""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from ..schema import NodeConfig
from .extras import require_extra

# runtime -> the quantize modes its own quantizer offers
RUNTIMES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("dynamic", "static", "none"),
    "openvino": ("static", "none"),
    "torch_compile": ("static", "dynamic", "none"),
}

_DEFAULT_QUANTIZE = {"onnxruntime": "dynamic", "openvino": "static", "torch_compile": "static"}


class DeployConfig(NodeConfig):
    """Hand the chain's float model to a runtime and measure it there (the last node of a chain).

    ``quantize``: ``dynamic`` (int8 weights, activations quantized per call: ORT ``quantize_dynamic``,
    PT2E dynamic), ``static`` (calibrated int8 activations: ORT ``quantize_static`` QDQ, NNCF PTQ,
    PT2E with the x86 inductor quantizer), ``none`` (fp32 in the runtime); ``auto`` picks the
    runtime's usual int8 (dynamic for ONNX Runtime, static otherwise).
    """

    kind: Literal["deploy"] = "deploy"
    runtime: Literal["onnxruntime", "openvino", "torch_compile"] = "onnxruntime"
    quantize: Literal["auto", "dynamic", "static", "none"] = "auto"
    calibration_batches: int = Field(8, ge=1, description="batches of training data that calibrate static int8")
    threads: Optional[int] = Field(None, ge=1, description="runtime threads (default: common.num_threads, "
                                                           "else the runtime's default)")
    per_channel: bool = Field(True, description="one weight scale per output channel (ONNX Runtime)")
    model_type: Literal["auto", "transformer", "default"] = Field(
        "auto", description="NNCF preset: transformer (SmoothQuant, no int8 softmax/LayerNorm) for models with "
                            "attention; auto detects it")
    tolerance: float = Field(0.2, gt=0, description="largest accepted relative output error ||y_rt - y|| / ||y|| "
                                                    "of the reloaded artifact against the torch model")
    opset: int = Field(17, ge=13, description="ONNX opset of the export")
    compile: Literal["jit", "aot"] = Field(
        "jit", description="torch_compile: jit (torch.compile at the first call of each shape) or aot (an "
                           "AOTInductor package compiled in the node, model.aoti/, loaded and called without "
                           "compiling)")
    produces_int8: ClassVar[bool] = True  # nothing trains after it: the model left torch

    @model_validator(mode="after")
    def _check_quantize(self) -> "DeployConfig":
        require_extra(self.runtime)  # refused when the setup loads, without importing the runtime
        if self.compile == "aot" and self.runtime != "torch_compile":
            raise ValueError(f"compile=aot is a torch_compile option (AOTInductor); runtime {self.runtime} loads its "
                             f"artifact as it is (got runtime={self.runtime!r})")
        allowed = RUNTIMES[self.runtime]
        if self.quantize == "auto":
            object.__setattr__(self, "quantize", _DEFAULT_QUANTIZE[self.runtime])
        elif self.quantize not in allowed:
            raise ValueError(f"runtime {self.runtime} quantizes with {', '.join(allowed)} "
                             f"(got quantize={self.quantize!r})")
        return self
