"""torch.ao building blocks: the quantized engine, CPU capabilities, observers and qconfigs.

Why torch.ao (eager module swap for dynamic, FX graph mode for static/QAT) and
not torchao's ``quantize_`` or pt2e: measured in ``benchmarks/studies/quant_backends.py``
(see ``benchmarks/RESULTS.md``, Quantization) -- torch.ao modules run int8 kernels in
plain eager mode and serialise to tensors; the other two are only fast after
``torch.compile`` and their weights are not plain state-dict tensors.
"""
from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.ao.quantization import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
)

ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")


def supported_engines() -> list[str]:
    return [e for e in ENGINES if e in torch.backends.quantized.supported_engines]


@contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    """Use ``name``'s kernels while packing weights (the packed format is engine specific)."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation notices and 'observer never ran' warnings (replays run no data)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao.*")
        warnings.filterwarnings("ignore", message=r".*(deprecated|must run observer).*")
        yield


@functools.lru_cache(maxsize=1)
def has_vnni() -> bool:
    """True when int8 dot products accumulate in int32 (AVX512-VNNI): 8-bit activations cannot saturate."""
    try:
        return bool(torch.cpu._is_vnni_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        return False


def reduce_range_for(engine: str) -> bool:
    """fbgemm-based engines use 7-bit activations in static quantization (safe on every x86 CPU)."""
    return engine in ("x86", "fbgemm")


class PercentileObserver(MinMaxObserver):
    """Activation range = running mean over batches of the [100-p, p] percentiles (clips rare outliers)."""

    def __init__(self, percentile: float = 99.99, max_samples: int = 1 << 20, **kwargs):
        super().__init__(**kwargs)
        self.percentile = percentile
        self.max_samples = max_samples
        self.register_buffer("batches", torch.tensor(0))

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().float().flatten()
        if x.numel() > self.max_samples:  # torch.quantile's input limit; a strided sample is enough
            x = x[:: x.numel() // self.max_samples + 1]
        q = torch.quantile(x, torch.tensor([1 - self.percentile / 100, self.percentile / 100], device=x.device))
        n = int(self.batches)
        lo, hi = q[0].to(self.min_val.dtype), q[1].to(self.max_val.dtype)
        if n == 0:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            self.min_val.copy_((self.min_val * n + lo) / (n + 1))
            self.max_val.copy_((self.max_val * n + hi) / (n + 1))
        self.batches += 1
        return x_orig


def activation_observer(kind: str, engine: str, percentile: float = 99.99):
    """Observer factory for activations (quint8, per tensor) named by ``kind``."""
    common = dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=reduce_range_for(engine))
    if kind == "minmax":
        return MinMaxObserver.with_args(**common)
    if kind == "moving_average":
        return MovingAverageMinMaxObserver.with_args(averaging_constant=0.01, **common)
    if kind == "histogram":
        return HistogramObserver.with_args(**common)
    if kind == "percentile":
        return PercentileObserver.with_args(percentile=percentile, **common)
    raise ValueError(f"unknown observer {kind!r}; allowed: minmax, moving_average, histogram, percentile")


def weight_observer(per_channel: bool):
    if per_channel:
        return PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)


def static_qconfig(engine: str, per_channel: bool, observer: str, percentile: float = 99.99) -> QConfig:
    return QConfig(activation=activation_observer(observer, engine, percentile), weight=weight_observer(per_channel))


def qat_qconfig(engine: str, per_channel: bool) -> QConfig:
    """Fake quantization with moving-average ranges (torch.ao's default QAT recipe), per-tensor or per-channel."""
    from torch.ao.quantization import FusedMovingAvgObsFakeQuantize

    act = FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=127 if reduce_range_for(engine) else 255,
        dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    if per_channel:
        weight = FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric)
    else:
        weight = FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric)
    return QConfig(activation=act, weight=weight)


def lsq_qconfig(engine: str, out_channels: int | None) -> QConfig:
    """LSQ-style learnable scales (torch.ao's ``_LearnableFakeQuantize``); per-channel needs the layer's width."""
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    act = _LearnableFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=127 if reduce_range_for(engine) else 255,
        dtype=torch.quint8, qscheme=torch.per_tensor_affine, use_grad_scaling=True)
    if out_channels:
        weight = _LearnableFakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric, channel_len=out_channels, use_grad_scaling=True)
    else:
        weight = _LearnableFakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric, use_grad_scaling=True)
    return QConfig(activation=act, weight=weight)


def qconfig_mapping(qconfig: QConfig, engine: str, is_qat: bool) -> QConfigMapping:
    """torch.ao's default mapping for ``engine`` (fixed-range ops, LayerNorm...) with ``qconfig`` as default."""
    from torch.ao.quantization.qconfig_mapping import _get_default_qconfig_mapping_with_default_qconfig

    return _get_default_qconfig_mapping_with_default_qconfig(is_qat, engine, qconfig)
