"""Drop-in modules of the focused convolution: the AoI threshold and the focused conv.

Both are stateless with respect to the AoI: the mask is a tensor that flows from AoIThreshold to
each FocusedConv2d through the graph, never an attribute kept between calls.
"""
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .. import ops
from ..ops._utils import pair
from ..ops.focused_conv2d import conv_output_size
from ._notrace import register_notrace_module

REDUCES = ("sum", "mean")


def _check_threshold(where: str, threshold, reduce: str) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{where}: threshold must be a float, got {type(threshold).__name__}")
    threshold = float(threshold)
    if threshold != threshold or threshold in (float("inf"), float("-inf")):
        raise ValueError(f"{where}: threshold must be finite, got {threshold}")
    if reduce not in REDUCES:
        raise ValueError(f"{where}: reduce must be one of {REDUCES}, got {reduce!r}")
    return threshold


@register_notrace_module
class AoIThreshold(nn.Module):
    """x [N, C, H, W] -> bool mask [N, H, W]: ``reduce(x, dim=1) >= threshold`` (one AoI per image)."""

    def __init__(self, threshold: float, reduce: str = "sum"):
        super().__init__()
        self.threshold = _check_threshold("fxeff.nn.AoIThreshold", threshold, reduce)
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.aoi_mask(x, self.threshold, self.reduce)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, reduce={self.reduce!r}"


def _pair(name: str, value) -> Tuple[int, int]:
    return tuple(pair(name, "nn.FocusedConv2d", value))


@register_notrace_module
class FocusedConv2d(nn.Conv2d):
    """nn.Conv2d computed only inside the AoI: forward(x, mask) = conv(x) where the mask is active, 0 elsewhere.

    ``mask`` is bool [N, h, w] at any resolution; it is carried to the output grid with
    ``mask_resize`` ("any" when shrinking, nearest when growing) when it differs. Only zero padding
    is supported: other padding modes are refused rather than silently changed.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Tuple[int, int]],
                 stride: Union[int, Tuple[int, int]] = 1, padding: Union[int, Tuple[int, int]] = 0,
                 dilation: Union[int, Tuple[int, int]] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None):
        if padding_mode != "zeros":
            raise ValueError(f"fxeff.nn.FocusedConv2d: padding_mode must be 'zeros', got {padding_mode!r} "
                             "(other modes are not computed by focused_conv2d and are never silently changed)")
        if isinstance(padding, str):
            raise ValueError(f"fxeff.nn.FocusedConv2d: padding must be an int or 2 ints, got {padding!r}")
        super().__init__(in_channels, out_channels, _pair("kernel_size", kernel_size), _pair("stride", stride),
                         _pair("padding", padding), _pair("dilation", dilation), groups, bias, padding_mode,
                         device=device, dtype=dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "FocusedConv2d":
        """A FocusedConv2d that SHARES ``conv``'s weight and bias Parameters (training one trains the other)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"fxeff.nn.FocusedConv2d.from_conv: expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"fxeff.nn.FocusedConv2d.from_conv: padding_mode must be 'zeros', "
                             f"got {conv.padding_mode!r}")
        padding = explicit_padding(conv)
        if padding is None:
            raise ValueError(f"fxeff.nn.FocusedConv2d.from_conv: padding={conv.padding!r} is asymmetric for "
                             f"kernel {conv.kernel_size} dilation {conv.dilation}; focused_conv2d takes symmetric padding")
        focused = cls.__new__(cls)
        nn.Module.__init__(focused)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode"):
            setattr(focused, name, getattr(conv, name))
        focused.padding = padding
        focused._reversed_padding_repeated_twice = [p for p in reversed(padding) for _ in range(2)]
        focused.weight = conv.weight
        focused.bias = conv.bias
        return focused

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """The output grid (Hout, Wout) for an input of height x width."""
        h, w = (conv_output_size(size, k, s, p, d)
                for size, k, s, p, d in zip((height, width), self.kernel_size, self.stride, self.padding, self.dilation))
        return h, w

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None:
            raise ValueError("fxeff.nn.FocusedConv2d.forward: mask is required (bool [N, h, w], the AoI); "
                             "use nn.Conv2d for a dense conv")
        if x.dim() != 4:
            raise ValueError(f"fxeff.nn.FocusedConv2d.forward: x must be 4-D [N, C, H, W], got {x.dim()}-D")
        size = self.output_size(x.shape[-2], x.shape[-1])
        if mask.dim() == 3 and tuple(mask.shape[-2:]) != size:
            mask = ops.mask_resize(mask, list(size))
        return ops.focused_conv2d(x, self.weight, self.bias, mask, list(self.stride), list(self.padding),
                                  list(self.dilation), self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", focused=True"


def explicit_padding(conv: nn.Conv2d) -> Optional[Tuple[int, int]]:
    """conv's padding as 2 ints; 'same'/'valid' resolved; None when 'same' would need asymmetric padding."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    padding = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        total = d * (k - 1)
        if total % 2:
            return None
        padding.append(total // 2)
    return tuple(padding)


__all__ = ["AoIThreshold", "FocusedConv2d", "explicit_padding"]
