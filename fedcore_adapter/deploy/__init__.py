"""Deployment runtimes: the chain's float model handed to ONNX Runtime, OpenVINO or torch.compile.

A ``deploy`` node (``config``, ``node``) exports the model it receives, quantizes it with the
runtime's own quantizer, writes the artifact into its folder, reloads it and checks its outputs
against the torch model. What it returns is a :class:`~.runner.Runner`: a callable module running
the artifact in its runtime, which ``metrics.measure`` times and evaluates like any model.

- ``signature``: the model's inputs as named positional tensors, the export wrapper, failing-layer lookup.
- ``onnxruntime`` / ``openvino`` / ``torch_compile``: one module per runtime (export, quantize, load).
- ``artifacts``: load an exported artifact by its path (``model.onnx``, ``model.xml``, ``model.pt2``).
"""
from .artifacts import load_artifact
from .config import DeployConfig, RUNTIMES

__all__ = ["DeployConfig", "RUNTIMES", "load_artifact"]
