"""int8 module classes of the dynamic path: torch.ao's dynamic Linear with 8-bit activations
where the CPU allows it, a SmoothQuant variant that rescales its input channels first, and
``DynamicConv``: convolutions as im2col + the same int8 GEMM, what plans written before
``Int8Conv`` (``conv.py``, a direct int8 convolution, 2-3x faster) replay.

torch.ao's dynamic modules always quantize activations to 7 bits (``reduce_range=True``)
because int8 dot products saturate int16 on CPUs without VNNI. On VNNI CPUs the full 8
bits are safe and halve the activation rounding error; the choice is made at run time,
so a checkpoint stays correct on any CPU. ``int8_gemm`` and ``dynamic_qparams`` are the int8
arithmetic (as fbgemm rounds) that ``conv.py`` and ``int8_ops.py`` share.
"""
from __future__ import annotations

import math

import torch
import torch.ao.nn.quantized.dynamic as nnqd
import torch.nn.functional as F
from torch import nn

from .backends import has_vnni


def int8_gemm(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int,
              qweight_t: torch.Tensor, colsum: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to uint8 ``[0, qmax]`` times int8 ``qweight_t`` ``[in, out]``, as int32 (``aten._int_mm``).

    uint8 ``q`` is fed as int8 ``q - 128``; the shift comes back as ``(128 - zero_point) * colsum``.
    """
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, 0, qmax)  # as fbgemm: times the float inverse
    acc = torch._int_mm((q - 128).to(torch.int8), qweight_t)
    return acc + (128 - zero_point).to(torch.int32) * colsum


def dynamic_qparams(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``(scale, zero point)`` of ``x`` on ``[0, qmax]`` as fbgemm's dynamic kernels choose them:
    the range widened to include 0, the scale in double then float, the zero point from the end with less error."""
    lo, hi = x.min().clamp(max=0).double(), x.max().clamp(min=0).double()
    scale = ((hi - lo) / qmax).float().clamp(min=torch.finfo(torch.float32).eps)
    s = scale.double()
    from_min, from_max = -lo / s, qmax - hi / s
    zp = torch.where((lo / s).abs().neg() < qmax - (hi / s).abs(), from_min, from_max)
    return scale, zp.round().clamp(0, qmax).float()


def _reduce(module: nn.Module) -> bool:
    return getattr(module, "activation_range", "auto") != "auto" or not has_vnni()


class DynamicLinear(nnqd.Linear):
    """Dynamic int8 Linear; activations use 8 bits on VNNI CPUs (``activation_range='auto'``)."""

    activation_range: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=_reduce(self))
        return y.to(x.dtype)

    def _get_name(self) -> str:
        return "DynamicInt8Linear"


class SmoothDynamicLinear(DynamicLinear):
    """SmoothQuant: ``x / s`` feeds int8 weights ``W * s`` (``s`` per input channel, a buffer)."""

    def __init__(self, in_features: int, out_features: int, bias_: bool = True, dtype: torch.dtype = torch.qint8):
        super().__init__(in_features, out_features, bias_, dtype=dtype)
        self.register_buffer("input_scale", torch.ones(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.input_scale)

    def _get_name(self) -> str:
        return "SmoothDynamicInt8Linear"


def im2col_apply(x: torch.Tensor, geometry: dict, matmul) -> torch.Tensor:
    """A convolution as ``matmul`` over patches (``[N * positions, C * kernel] -> [.., out]``).

    Patches are strided views (``Tensor.unfold``) copied once into rows; ``F.unfold``
    (a per-sample loop) only where the kernel is dilated.
    """
    dims = geometry["dims"]
    k, s, p, d = (tuple(geometry[key]) for key in ("kernel_size", "stride", "padding", "dilation"))
    if any(v != 1 for v in d):
        return _im2col_dilated(x, geometry, matmul)
    n, c = x.shape[:2]
    if any(p):
        x = F.pad(x, [pad for pad in reversed(p) for _ in range(2)])
    for i in range(dims):
        x = x.unfold(2 + i, k[i], s[i])  # [N, C, *positions, *kernel]
    positions = x.shape[2:2 + dims]
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]  # [N, *positions, C, *kernel]
    y = matmul(x.permute(order).reshape(-1, x.shape[1] * math.prod(k))).reshape(n, *positions, -1)
    return y.permute(0, dims + 1, *range(1, dims + 1)).contiguous()


def _im2col_dilated(x: torch.Tensor, geometry: dict, matmul) -> torch.Tensor:
    one_d = geometry["dims"] == 1
    if one_d:
        x = x.unsqueeze(2)
    k, s, p, d = (tuple(geometry[key]) for key in ("kernel_size", "stride", "padding", "dilation"))
    if one_d:
        k, s, p, d = (1, k[0]), (1, s[0]), (0, p[0]), (1, d[0])
    n, _, h, w = x.shape
    h_out = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    w_out = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s).transpose(1, 2)  # [N, positions, C*kh*kw]
    y = matmul(cols.reshape(-1, cols.shape[-1])).reshape(n, h_out * w_out, -1).transpose(1, 2)
    return y.reshape(n, -1, w_out) if one_d else y.reshape(n, -1, h_out, w_out)


class DynamicConv(DynamicLinear):
    """Dynamic int8 Conv1d/Conv2d as im2col + the dynamic int8 GEMM (plans without ``conv_kernel``).

    torch.ao's own dynamic convolutions re-quantize their output with the
    *input's* range, clipping every output larger than the input; the int8
    GEMM behind dynamic Linear returns float outputs and has no such limit.
    """

    geometry: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return im2col_apply(x, self.geometry, super().forward)

    @classmethod
    def from_conv(cls, conv: nn.Module) -> "DynamicConv":
        """Quantize ``conv`` (its ``qconfig`` set) with its kernel flattened to ``[out, in * kernel]``."""
        flat = nn.Linear(conv.weight[0].numel(), conv.out_channels, bias=conv.bias is not None)
        flat.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1))
        if conv.bias is not None:
            flat.bias = nn.Parameter(conv.bias.detach())
        flat.qconfig = conv.qconfig
        quantized = cls.from_float(flat)
        quantized.geometry = conv_geometry(conv)
        return quantized

    def _get_name(self) -> str:
        return "DynamicInt8Conv"

    def extra_repr(self) -> str:
        g = self.geometry
        return f"{super().extra_repr()}, kernel_size={g.get('kernel_size')}, stride={g.get('stride')}"


def conv_geometry(conv: nn.Module) -> dict:
    return {"dims": conv.weight.dim() - 2, "kernel_size": list(conv.kernel_size), "stride": list(conv.stride),
            "padding": list(conv.padding), "dilation": list(conv.dilation)}


def dynamic_conv_float_reason(conv: nn.Module) -> str | None:
    """Why ``conv`` is not what ``Int8Conv``/im2col cover (Conv1d/Conv2d, groups=1, numeric zero padding);
    None if it is."""
    name = type(conv).__name__
    if type(conv) not in (nn.Conv1d, nn.Conv2d):
        return f"{name}: the int8 conv kernel takes Conv1d/Conv2d only; ptq_static quantizes it"
    if conv.groups != 1:
        return "grouped/depthwise conv (groups > 1): the int8 conv kernel takes groups=1 only; ptq_static quantizes it"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: the int8 conv kernel pads with zeros only"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}: the int8 conv kernel takes numeric padding only"
    return None


# float module type -> our dynamic int8 class
DYNAMIC_CLASSES: dict[type, type] = {nn.Linear: DynamicLinear, nn.Conv1d: DynamicConv, nn.Conv2d: DynamicConv}
