"""tile_conv2d: a conv without padding over a batch of tiles that carry their own halo (region execution).

Contract: equals ``F.conv2d(tiles, weight, bias, stride, padding=0, dilation, groups)``, the output contiguous in
the tiles' memory format (NCHW or channels_last). It exists as an op, not as aten.convolution, because region
execution runs convs on a tile batch whose size is data-dependent, and at such sizes inductor mispredicts the
vendor conv's output strides (docs/regions.md); as an op with this fake kernel it stays exact under
torch.compile and AOTInductor. Gradients flow to tiles, weight and bias.
"""
from typing import Optional

import torch

from ._utils import IntPair, memory_format_of, pair
from .focused_conv2d import conv_output_size


@torch.fx.wrap
def tile_conv2d(tiles: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                stride: IntPair = 1, dilation: IntPair = 1, groups: int = 1) -> torch.Tensor:
    """F.conv2d with padding 0 on a tile batch [T, C, h, w] (each tile holds its halo)."""
    return torch.ops.fxeff.tile_conv2d(tiles, weight, bias, pair("stride", "tile_conv2d", stride),
                                       pair("dilation", "tile_conv2d", dilation), groups)


@torch.library.register_fake("fxeff::tile_conv2d")
def _tile_conv2d_fake(tiles, weight, bias, stride, dilation, groups):
    torch._check(tiles.dim() == 4, lambda: f"fxeff.tile_conv2d: tiles must be 4-D [T, C, h, w], got {tiles.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"fxeff.tile_conv2d: weight must be 4-D, got {weight.dim()}-D")
    torch._check(tiles.shape[1] == weight.shape[1] * groups,
                 lambda: f"fxeff.tile_conv2d: tiles must have weight.size(1) * groups = {weight.shape[1] * groups} "
                         f"channels, got {tiles.shape[1]}")
    ho = conv_output_size(tiles.shape[2], weight.shape[2], stride[0], 0, dilation[0])
    wo = conv_output_size(tiles.shape[3], weight.shape[3], stride[1], 0, dilation[1])
    out = tiles.new_empty((tiles.shape[0], weight.shape[0], ho, wo))
    return out.contiguous(memory_format=memory_format_of(tiles))


# Autograd: csrc/ops/autograd.cpp (the vendor conv backward with padding 0).
