"""Quantization nodes ending in real int8 kernels: ``ptq_dynamic``, ``ptq_static``, ``qat``.

- ``config``: the pydantic configs (FedCore names accepted).
- ``dynamic`` / ``static`` / ``qat``: one apply function each.
- ``ao``: the torch.ao prepare/convert flow (FX graph or eager) shared by static and QAT.
- ``modules``: dynamic int8 modules (8-bit activations on VNNI CPUs, SmoothQuant input scales).
- ``selective``: ``skip`` patterns and the sensitivity-driven automatic mode.
- ``folding`` (conv+BatchNorm), ``calibration`` (data, checks), ``backends`` (engines, qconfigs).
- ``replay``: rebuilds the int8 structure on a fresh model for checkpoints; ``export``: torch.export archive
  of the int8 model in core aten ops (``int8_ops``).
"""
from . import dynamic, qat, replay, static  # noqa: F401 - importing registers the kinds and the replay
from .config import AutoSkip, PTQDynamicConfig, PTQStaticConfig, QATConfig

__all__ = ["AutoSkip", "PTQDynamicConfig", "PTQStaticConfig", "QATConfig"]
