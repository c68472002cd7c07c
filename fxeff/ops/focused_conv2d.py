"""focused_conv2d: a conv computed only at the active outputs of a per-image mask.

Contract: out[n, :, i, j] == F.conv2d(x, weight, bias, ...)[n, :, i, j] where mask[n, i, j], and 0 (or, given
``fill``, fill[o] in channel o) elsewhere; then the epilogue: given ``residual`` (the output's shape), it is added
to every output (a residual connection), and given ``clamp_min`` / ``clamp_max`` the result is clamped as
torch.clamp does (ReLU is clamp_min=0, ReLU6 clamp_min=0 and clamp_max=6, Hardtanh its bounds), so an inactive
output holds clamp(fill + residual). The mask is bool [N, Hout, Wout] at the conv's output resolution. Gradients
flow to x, weight and bias (only through the active outputs), to fill (from the inactive ones) and to residual
(everywhere), each through the clamp as torch.clamp's gradient does (zero where the value lies outside the bounds).
"""
from contextlib import contextmanager
from typing import Dict, Optional

import torch

from ._utils import IntPair, conv_memory_format, memory_format_of, pair

STRATEGIES = ("empty", "dense", "crop", "tiles", "pixels", "direct")


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@torch.fx.wrap
def focused_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor,
                   stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1,
                   fill: Optional[torch.Tensor] = None, clamp_min: Optional[float] = None,
                   clamp_max: Optional[float] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.conv2d restricted to the outputs where ``mask`` (bool [N, Hout, Wout]) is true; elsewhere zeros, or with
    ``fill`` (one value per output channel, any shape of O elements) that channel's fill value, written by the
    kernel in the same pass (gradients reach ``fill`` from the inactive outputs). ``clamp_min`` / ``clamp_max``:
    the result clamped, as ``torch.clamp(out, clamp_min, clamp_max)`` (ReLU, ReLU6, Hardtanh fused into the conv:
    the kernel clamps the active outputs as it stores them and writes the clamped fill elsewhere). ``residual`` (the
    output's shape): added to every output before the clamp (a residual add fused into the conv)."""
    return torch.ops.fxeff.focused_conv2d(x, weight, bias, mask, pair("stride", "focused_conv2d", stride),
                                          pair("padding", "focused_conv2d", padding),
                                          pair("dilation", "focused_conv2d", dilation), groups, fill,
                                          None if clamp_min is None else float(clamp_min),
                                          None if clamp_max is None else float(clamp_max), residual)


@torch.library.register_fake("fxeff::focused_conv2d")
def _focused_conv2d_fake(x, weight, bias, mask, stride, padding, dilation, groups, fill=None, clamp_min=None,
                         clamp_max=None, residual=None):
    torch._check(x.dim() == 4, lambda: f"fxeff.focused_conv2d: x must be 4-D [N, C, H, W], got {x.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"fxeff.focused_conv2d: weight must be 4-D, got {weight.dim()}-D")
    ho = conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    torch._check(mask.dtype == torch.bool and tuple(mask.shape) == (x.shape[0], ho, wo),
                 lambda: f"fxeff.focused_conv2d: mask must be bool [N, Hout, Wout] = "
                         f"[{x.shape[0]}, {ho}, {wo}], got {tuple(mask.shape)} {mask.dtype}")
    torch._check(fill is None or fill.numel() == weight.shape[0],
                 lambda: f"fxeff.focused_conv2d: fill must hold one value per output channel ({weight.shape[0]}), "
                         f"got {tuple(fill.shape)}")
    torch._check(residual is None or tuple(residual.shape) == (x.shape[0], weight.shape[0], ho, wo),
                 lambda: f"fxeff.focused_conv2d: residual must be the output's shape "
                         f"[{x.shape[0]}, {weight.shape[0]}, {ho}, {wo}], got {tuple(residual.shape)}")
    out = x.new_empty((x.shape[0], weight.shape[0], ho, wo))
    return out.contiguous(memory_format=conv_memory_format(x, weight))


@torch.library.register_fake("fxeff::focused_conv2d_backward")
def _focused_conv2d_backward_fake(grad_out, x, weight, mask, stride, padding, dilation, groups):
    grad_x = torch.empty_like(x, memory_format=memory_format_of(x))
    return grad_x, torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty((weight.shape[0],))


# Autograd: csrc/ops/autograd.cpp (C++, so that inference never enters Python); the backward is the op
# focused_conv2d_backward above.


def strategy_counters(reset: bool = False) -> Dict[str, int]:
    """How many calls ran each execution strategy (since start or the last reset)."""
    return dict(zip(STRATEGIES, torch.ops.fxeff._focused_conv2d_counters(reset)))


def direct_strategy_available() -> bool:
    """Whether this CPU runs the "direct" strategy (the implicit-GEMM micro-kernel: fp32, groups 1, AVX-512)."""
    return bool(torch.ops.fxeff._focused_conv2d_direct_available())


@contextmanager
def forced_strategy(strategy: str, tile: int = 0):
    """Forces one execution strategy ("auto", "dense", "crop", "tiles", "pixels", "direct") within the block.

    ``tile`` (0 = the kernel's pick) is the tile side for "tiles" and the pixels per chunk for "pixels" and
    "direct". Forcing "direct" where it cannot run (not fp32, groups > 1, no AVX-512) raises NotImplementedError.

    For benchmarks and tests; process-wide, so do not use it from several threads at once.
    """
    previous = torch.ops.fxeff._focused_conv2d_set_strategy(strategy, tile)
    try:
        yield
    finally:
        torch.ops.fxeff._focused_conv2d_set_strategy(previous, 0)
