"""narrow_conv2d: a conv with few input or output channels, as pruning leaves them (fxeff.blocks' descendants).

Contract: ``narrow_conv2d(x, weight, bias, stride, padding, dilation, clamp_min, clamp_max, residual) ==
(F.conv2d(x, weight, bias, stride, padding, dilation) + residual).clamp(clamp_min, clamp_max)`` (groups 1; no
residual where it is None, no clamp where both bounds are; ReLU is clamp_min=0; a residual block's last conv, add
and ReLU in one op), the output in the vendor conv's memory format. Why an op: the vendor AVX-512 convs
put 16 output channels in a vector, so a conv with 3 outputs costs what one with 16 does; the CPU kernel
(csrc/ops/cpu/narrow_conv2d_kernel.cpp) puts 16 output pixels in a vector instead. It runs for float32 on a CPU
with AVX-512 where its flattened addressing holds (stride 1 with same-width padding; larger strides through the
input's phase planes where no tap needs a column past the output's width); other calls (and other devices) run
the vendor conv, which computes the same function. Gradients flow to x, weight, bias and residual
(csrc/ops/autograd.cpp).
"""
from typing import Optional

import torch

from ._utils import IntPair, conv_memory_format, pair
from .focused_conv2d import conv_output_size


@torch.fx.wrap
def narrow_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: IntPair = 1,
                  padding: IntPair = 0, dilation: IntPair = 1, clamp_min: Optional[float] = None,
                  clamp_max: Optional[float] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.conv2d (groups 1), plus ``residual`` where given, then clamp(clamp_min, clamp_max) where either is given."""
    return torch.ops.fxeff.narrow_conv2d(x, weight, bias, pair("stride", "narrow_conv2d", stride),
                                         pair("padding", "narrow_conv2d", padding),
                                         pair("dilation", "narrow_conv2d", dilation), clamp_min, clamp_max, residual)


@torch.library.register_fake("fxeff::narrow_conv2d")
def _narrow_conv2d_fake(x, weight, bias, stride, padding, dilation, clamp_min=None, clamp_max=None, residual=None):
    torch._check(x.dim() == 4, lambda: f"fxeff.narrow_conv2d: x must be 4-D [N, C, H, W], got {x.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"fxeff.narrow_conv2d: weight must be 4-D, got {weight.dim()}-D")
    torch._check(x.shape[1] == weight.shape[1],
                 lambda: f"fxeff.narrow_conv2d: groups must be 1: x has {x.shape[1]} channels, weight takes "
                         f"{weight.shape[1]}")
    ho = conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    shape = (x.shape[0], weight.shape[0], ho, wo)
    torch._check(residual is None or tuple(residual.shape) == shape,
                 lambda: f"fxeff.narrow_conv2d: residual must have the output's shape {list(shape)}, got "
                         f"{list(residual.shape)}")
    return x.new_empty(shape).contiguous(memory_format=conv_memory_format(x, weight))


# Autograd: csrc/ops/autograd.cpp (the clamp's mask from the output: the residual's gradient; then the vendor conv
# backward).
