"""Dynamic int8 convolution: the input quantized per tensor on each call, then a direct int8 convolution.

``Int8Conv`` holds its weights as plain tensors (int8 values, one float scale per output
channel, float bias), so a checkpoint is tensors only. Its kernel is oneDNN's int8
convolution (``onednn::qconv{1,2}d_pointwise``, the one Inductor's x86 int8 path calls):
uint8 activations x int8 weights, int32 accumulation, float output, with a following ReLU
fused when the plan says so. oneDNN writes its output channels-last; it stays so where
the plan found that only another ``Int8Conv`` reads it, and is made contiguous elsewhere.
The output is float, so no output range has to be known in
advance (torch.ao's ``conv1d_dynamic`` re-quantizes its output with the *input's* range
and clips). Where this torch build has no oneDNN int8 convolution, the same numbers come
from im2col + ``aten._int_mm`` (``int8_ops``), slower but still int8.

Activations use the full uint8 range on VNNI CPUs and 7 bits elsewhere (``activation_range``),
as the dynamic Linears do.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .modules import _reduce, conv_geometry, dynamic_qparams, im2col_apply, int8_gemm


@functools.lru_cache(maxsize=1)
def has_onednn_qconv() -> bool:
    """True when this torch build runs oneDNN's int8 convolution on this CPU (checked once, on a tiny conv)."""
    try:
        w = torch.ones(2, 1, 1, dtype=torch.int8)
        packed = torch.ops.onednn.qconv_prepack(w, torch.ones(2), 1.0, 0, [1], [0], [1], 1, None)
        y = torch.ops.onednn.qconv1d_pointwise(torch.full((1, 1, 3), 3, dtype=torch.uint8), 0.5, 1, packed,
                                              torch.ones(2), torch.zeros(2, dtype=torch.long), None, [1], [0], [1], 1,
                                              1.0, 0, torch.float32, "none", [], "")
        return bool(torch.allclose(y, torch.ones(1, 2, 3)))
    except (AttributeError, RuntimeError):  # no oneDNN in this build / no int8 kernel for this CPU
        return False


def quantize_dynamic_uint8(x: torch.Tensor, reduce_range: bool) -> tuple[torch.Tensor, float, int]:
    """``x`` as uint8 values with per-tensor ``(scale, zero point)`` chosen from its range (as fbgemm chooses them).

    Quantizes in ``x``'s own memory order (channels-last stays channels-last, no transposing
    copy) and reads the quantized tensor's bytes in place (``int_repr`` would copy them).
    """
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    dense = x.permute(order).contiguous()
    q = torch.quantize_per_tensor_dynamic(dense, torch.quint8, reduce_range)
    raw = torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())
    return raw.permute([order.index(d) for d in range(x.dim())]), q.q_scale(), q.q_zero_point()


class Int8Conv(nn.Module):
    """Dynamic int8 Conv1d/Conv2d (``groups=1``): per-call input quantization, direct int8 convolution, float output."""

    activation_range: str = "auto"
    channels_last_output: bool = False  # True only where the plan found that another Int8Conv reads the output

    def __init__(self, out_channels: int, in_channels: int, kernel_size: list[int], bias: bool = True,
                 stride: Optional[list[int]] = None, padding: Optional[list[int]] = None,
                 dilation: Optional[list[int]] = None, relu: bool = False):
        super().__init__()
        dims = len(kernel_size)
        self.register_buffer("qweight", torch.zeros(out_channels, in_channels, *kernel_size, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self.geometry = {"dims": dims, "kernel_size": list(kernel_size), "stride": list(stride or [1] * dims),
                         "padding": list(padding or [0] * dims), "dilation": list(dilation or [1] * dims)}
        self.relu = relu
        self._packed: Optional[torch.Tensor] = None

    @property
    def in_channels(self) -> int:
        return self.qweight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.qweight.shape[0]

    @classmethod
    def from_conv(cls, conv: nn.Module, relu: bool = False) -> "Int8Conv":
        """Quantize ``conv``'s weight with its ``qconfig``'s weight observer (symmetric: zero points are 0)."""
        observer = conv.qconfig.weight()
        observer(conv.weight.detach())
        scale, zero_point = observer.calculate_qparams()
        if bool((zero_point != 0).any()):
            raise ValueError("int8 convolution weights must be quantized symmetrically (zero point 0)")
        scale = scale.float().reshape(-1).expand(conv.out_channels).contiguous()
        shape = [-1] + [1] * (conv.weight.dim() - 1)
        q = torch.clamp(torch.round(conv.weight.detach().float() / scale.view(shape)), -128, 127).to(torch.int8)
        g = conv_geometry(conv)
        module = cls(conv.out_channels, conv.in_channels, g["kernel_size"], conv.bias is not None,
                     g["stride"], g["padding"], g["dilation"], relu)
        module.qweight.copy_(q)
        module.w_scale.copy_(scale)
        if conv.bias is not None:
            module.bias.copy_(conv.bias.detach().float())
        return module

    def weight(self) -> torch.Tensor:
        """The int8 weight as a per-channel quantized tensor (what metrics and the export step read)."""
        return torch._make_per_channel_quantized_tensor(
            self.qweight, self.w_scale.double(), torch.zeros(self.qweight.shape[0], dtype=torch.long), 0)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_packed": None}  # copies and pickles re-pack on their first call

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None  # re-packed from the loaded int8 weight on the next call

    def _pack(self) -> torch.Tensor:
        if self._packed is None:
            g = self.geometry
            self._packed = torch.ops.onednn.qconv_prepack(self.qweight, self.w_scale, 1.0, 0, g["stride"],
                                                          g["padding"], g["dilation"], 1, None)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._onednn(x.float()) if has_onednn_qconv() else self._im2col(x.float())
        if not self.channels_last_output:
            y = y.contiguous()  # oneDNN writes channels-last; other readers may ``view`` the output
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        q, scale, zero_point = quantize_dynamic_uint8(x, _reduce(self))
        g = self.geometry
        op = torch.ops.onednn.qconv1d_pointwise if g["dims"] == 1 else torch.ops.onednn.qconv2d_pointwise
        return op(q, scale, zero_point, self._pack(), self.w_scale, torch.zeros_like(self.w_scale, dtype=torch.long),
                  self.bias, g["stride"], g["padding"], g["dilation"], 1, 1.0, 0, torch.float32,
                  "relu" if self.relu else "none", [], "")

    def _im2col(self, x: torch.Tensor) -> torch.Tensor:
        qmax = 127 if _reduce(self) else 255
        flat = self.qweight.reshape(self.qweight.shape[0], -1)
        weight_t, colsum = flat.t().contiguous(), flat.sum(1, dtype=torch.int32)

        def matmul(rows: torch.Tensor) -> torch.Tensor:
            scale, zero_point = dynamic_qparams(rows, qmax)
            acc = int8_gemm(rows, scale, zero_point, qmax, weight_t, colsum)
            y = acc.float() * (scale * self.w_scale)
            return y + self.bias if self.bias is not None else y

        y = im2col_apply(x, self.geometry, matmul)
        return F.relu(y) if self.relu else y

    def _get_name(self) -> str:
        return "DynamicInt8Conv"

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{self.qweight.shape[1]}, {self.qweight.shape[0]}, kernel_size={g['kernel_size']}, "
                f"stride={g['stride']}, padding={g['padding']}, relu={self.relu}")
