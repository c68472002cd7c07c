"""HetConv2d (Singh et al. CVPR'19, REFERENCE.md section 3): a KxK conv where each filter keeps its KxK taps on
one block of M/P input channels and only the centre tap (a 1x1 kernel) on the others.

Filter j's block is g = floor(j * P / N) (contiguous blocks; the paper's strided pattern is a channel
permutation of this). The weights are stored compactly (``weight_kxk`` [N, M/P, K, K] and ``weight_1x1``
[N, M - M/P]): structurally absent taps have no storage and no gradient. ``dense_weight()`` is the
equivalent masked [N, M, K, K] kernel, for checks and export to plain convs.
"""
import math
from typing import Tuple, Union

import torch
from torch import nn

from .. import ops
from ..ops._utils import pair
from ..ops.hetconv2d import block_columns
from ._notrace import register_notrace_module

INITS = ("centre", "sum")


def own_block_mask(out_channels: int, in_channels: int, part: int) -> torch.Tensor:
    """bool [N, M]: True where input channel c lies in filter j's KxK block g = floor(j * P / N)."""
    own, _ = block_columns(out_channels, in_channels, part, "cpu")
    return torch.zeros(out_channels, in_channels, dtype=torch.bool).scatter(1, own, True)


def _check_sizes(where: str, in_channels: int, out_channels: int, kernel_size: Tuple[int, int], part: int) -> None:
    if isinstance(part, bool) or not isinstance(part, int) or part < 1:
        raise ValueError(f"{where}: part must be an int >= 1, got {part!r}")
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if value < 1 or value % part:
            raise ValueError(f"{where}: {name} must be a positive multiple of part={part}, got {value}")
    if kernel_size[0] != kernel_size[1] or kernel_size[0] % 2 == 0:
        raise ValueError(f"{where}: kernel_size must be square and odd (1, 3, 5, 7, ...), got {kernel_size}")


@register_notrace_module
class HetConv2d(nn.Module):
    """Drop-in for ``nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias)``
    computed by ``fxeff.ops.hetconv2d`` with 1/P + (1 - 1/P)/K^2 of its MACs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Tuple[int, int]], part: int,
                 stride: Union[int, Tuple[int, int]] = 1, padding: Union[int, Tuple[int, int]] = 0,
                 dilation: Union[int, Tuple[int, int]] = 1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        where = "fxeff.nn.HetConv2d"
        kernel = tuple(pair("kernel_size", "nn.HetConv2d", kernel_size))
        _check_sizes(where, in_channels, out_channels, kernel, part)
        self.in_channels, self.out_channels, self.part = in_channels, out_channels, part
        self.kernel_size = kernel
        self.stride = tuple(pair("stride", "nn.HetConv2d", stride))
        self.padding = tuple(pair("padding", "nn.HetConv2d", padding))
        self.dilation = tuple(pair("dilation", "nn.HetConv2d", dilation))
        factory = {"device": device, "dtype": dtype}
        block = in_channels // part
        self.weight_kxk = nn.Parameter(torch.empty(out_channels, block, *kernel, **factory))
        self.weight_1x1 = nn.Parameter(torch.empty(out_channels, in_channels - block, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's default init (kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the
        weights and the bias) with fan_in the taps a filter really has."""
        bound = 1.0 / math.sqrt(self.fan_in)
        for p in (self.weight_kxk, self.weight_1x1) + ((self.bias,) if self.bias is not None else ()):
            nn.init.uniform_(p, -bound, bound)

    @property
    def fan_in(self) -> int:
        return self.weight_kxk[0].numel() + self.weight_1x1.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.hetconv2d(x, self.weight_kxk, self.weight_1x1, self.bias, self.part, self.stride, self.padding,
                             self.dilation)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense kernel [N, M, K, K] (zeros at the structurally absent taps)."""
        return ops.hetconv_dense_weight(self.weight_kxk, self.weight_1x1, self.part)

    def mac_ratio(self) -> float:
        """MACs of this layer / MACs of the dense KxK conv: 1/P + (1 - 1/P)/K^2."""
        k2 = self.kernel_size[0] * self.kernel_size[1]
        return self.fan_in / (self.in_channels * k2)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, part: int, init: str = "sum") -> "HetConv2d":
        """A HetConv2d approximating ``conv`` (new parameters; the conv is not changed).

        Each filter keeps the conv's KxK taps on its own block; on the other channels its single tap is
        the conv's centre tap (``init="centre"``) or the sum of the conv's taps (``init="sum"``: exact for
        inputs constant over the window, the better one on real images, see docs/benchmarks.md).
        """
        where = "fxeff.nn.HetConv2d.from_conv"
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{where}: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"{where}: conv.groups must be 1 (a standard conv), got {conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"{where}: conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            raise ValueError(f"{where}: conv.padding must be ints, got {conv.padding!r}")
        if init not in INITS:
            raise ValueError(f"{where}: init must be one of {INITS}, got {init!r}")
        return cls.from_weight(conv.weight, conv.bias, part, conv.stride, conv.padding, conv.dilation, init)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias, part: int, stride=1, padding=0, dilation=1,
                    init: str = "sum") -> "HetConv2d":
        """A HetConv2d approximating the conv with dense ``weight`` [N, M, K, K] and ``bias`` (see from_conv);
        new parameters, the tensors are copied."""
        n, m, kh, kw = weight.shape
        module = cls(m, n, (kh, kw), part, stride, padding, dilation, bias is not None, device=weight.device,
                     dtype=weight.dtype)
        with torch.no_grad():
            weight_kxk, weight_1x1 = compact_weights(weight.detach(), part, init)
            module.weight_kxk.copy_(weight_kxk)
            module.weight_1x1.copy_(weight_1x1)
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, part={self.part}, "
                f"stride={self.stride}")
        if any(self.padding):
            text += f", padding={self.padding}"
        if any(d != 1 for d in self.dilation):
            text += f", dilation={self.dilation}"
        return text + f", bias={self.bias is not None}"


def compact_weights(weight: torch.Tensor, part: int, init: str = "sum") -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight_kxk [N, M/P, K, K], weight_1x1 [N, M - M/P]) approximating a dense [N, M, K, K] kernel: each
    filter's KxK taps on its own block; on the other channels the centre tap ("centre") or the taps' sum ("sum")."""
    if init not in INITS:
        raise ValueError(f"fxeff.nn.hetconv.compact_weights: init must be one of {INITS}, got {init!r}")
    n, m, kh, kw = weight.shape
    own, other = block_columns(n, m, part, weight.device)
    single = weight[:, :, kh // 2, kw // 2] if init == "centre" else weight.sum((2, 3))
    return weight.gather(1, own[:, :, None, None].expand(n, m // part, kh, kw)), single.gather(1, other)
